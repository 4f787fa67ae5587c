"""The one detector contract.

A detector takes images (N, H, W) and returns one localisation table, a DataFrame with
columns ``frame, x, y, score`` (plus optional ones such as ``sigma``), in pixels with
the origin at the centre of pixel (0, 0).  Higher scores mean more confident.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from factory.errors import FactoryError

COLUMNS = ["frame", "x", "y", "score"]


@runtime_checkable
class Detector(Protocol):
    """What every detector is: TrackPy, TrackPy 3D and every network (``NetDetector``).

    Callers read these attributes as they are; a detector that lacks one does not meet
    the contract (``tests/test_detectors.py`` checks each one's presence, type and value).

    Attributes
    ----------
    name : str
        Its family in ``models.detectors.registry`` (``"trackpy"``, ``"spotnet"``, ...), or
        ``"trackpy3d"``; progress bars and logs show it.
    label : str
        How evaluations, tables and reports name it, e.g. ``"TrackPy (ours, tuned on val)"``.
    target : {"centroid", "exposure"}
        The truth its positions estimate: the particle's centroid over the whole frame
        (the paper's), or where the laser saw it (``loaders.datasets.TARGETS``).
    timestamps : {"scan", "frame"}
        The time its positions belong to (``models.tracking.timing.time_stamps``): ``"scan"``, the
        scan time at the position (what the laser saw); ``"frame"``, the frame's mean
        pixel time (a whole-frame centroid).  It also sets the motion-blur coefficient of
        the D estimates (``models.tracking.tracks.blur_r``).
    threshold : float or None
        Score from which a localisation counts (F1, ``factory predict`` and
        ``factory track``), in the detector's own score units (TrackPy: integrated mass;
        networks: confidence); tuned on validation data.  None: none tuned, every
        localisation counts.
    ndim : {2, 3}
        2: ``detect`` takes images (N, H, W); 3: z-stacks (N, Z, H, W), and the table
        adds ``z`` in planes from the first plane.
    z_step_um : float or None
        3D networks: the z step (um) of the stacks they were trained on, the step their
        z targets assume.  None where the detector does not depend on one (2D detectors,
        TrackPy 3D) or it is not known (an untrained network).
    """

    name: str
    label: str
    target: Literal["centroid", "exposure"]
    timestamps: Literal["scan", "frame"]
    threshold: float | None
    ndim: Literal[2, 3]
    z_step_um: float | None

    def detect(self, images: np.ndarray, progress: bool = False, min_score: float | None = None) -> pd.DataFrame:
        """Localise particles in ``images`` (N, H, W), or stacks (N, Z, H, W) where ``ndim`` is 3.

        Parameters
        ----------
        images : ndarray
            Frames (N, H, W) (one (H, W) frame is taken as N = 1), or stacks
            (N, Z, H, W) for a 3D detector, in photon counts or detector units.
        progress : bool
            A progress bar (stderr).
        min_score : float, optional
            Candidates scored below it may be left out.  Those the call would return
            without it and scored from it on are all kept (a network decodes only the
            peaks that can pass it: less work).  None: every candidate.

        Returns
        -------
        pandas.DataFrame
            One row per localisation: ``frame`` (index into ``images``), ``x``, ``y``
            (pixels, origin at the centre of pixel (0, 0)), ``score``, plus optional
            columns (``sigma``; ``z`` in planes from the first plane for stacks).  Every
            candidate (from ``min_score`` on, where given) is returned: ``threshold`` is
            for the caller to apply.
        """
        ...

    def batch_frames(self, height: int, width: int) -> int:
        """Frames of ``height`` x ``width`` px that ``detect`` processes together (1: one at a time).

        Fed that many per call, counted from the first frame, a detector returns the same
        table to the bit as from one call on every frame
        (``models.recordings.predict.localise``).
        """
        ...


def localisations(frame, pos, score, sigma=None) -> pd.DataFrame:
    """A localisation table with the contract's columns and dtypes.

    ``frame`` (int64), ``x, y`` (pixels) and for stacks ``z`` (planes from the first
    plane) from ``pos`` (M, 2 or 3), ``score`` and ``sigma`` (NaN where a detector has
    none).
    """
    pos = np.asarray(pos, np.float64)
    n = len(np.atleast_1d(frame)) if np.size(frame) else 0
    pos = pos.reshape(n, -1) if pos.size else np.zeros((0, pos.shape[-1] if pos.ndim == 2 else 2))
    data = {"frame": np.asarray(frame, np.int64).reshape(-1)}
    data.update({c: pos[:, k] for k, c in enumerate(("x", "y", "z")[:pos.shape[1]])})
    data["score"] = np.asarray(score, np.float64).reshape(-1)
    data["sigma"] = np.full(n, np.nan) if sigma is None else np.asarray(sigma, np.float64).reshape(-1)
    return pd.DataFrame(data)


def check_images(images, ndim: int = 2, name: str = "") -> np.ndarray:
    """Images as float32 (N, H, W) from (H, W) or (N, H, W); stacks (``ndim`` 3) as float32 (N, Z, H, W).

    Raises FactoryError when a stack detector (``name``) is given anything but
    (N, Z, H, W), ValueError for images of another shape.
    """
    a = np.asarray(images)
    if ndim == 3:
        if a.ndim != 4:
            raise FactoryError(f"{name} is a 3D stack detector: it localises in z-stacks (N, Z, H, W), "
                               f"not in an array of shape {a.shape}")
        return a.astype(np.float32, copy=False)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (H, W), got shape {a.shape}")
    return a.astype(np.float32, copy=False)
