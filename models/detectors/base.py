"""The one detector contract.

A detector takes images (N, H, W) and returns one localisation table, a DataFrame with
columns ``frame, x, y, score`` (plus optional ones such as ``sigma``), in pixels with
the origin at the centre of pixel (0, 0).  Higher scores mean more confident.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd

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

    def detect(self, images: np.ndarray, progress: bool = False) -> pd.DataFrame:
        """Localise particles in ``images`` (N, H, W), or stacks (N, Z, H, W) where ``ndim`` is 3.

        Parameters
        ----------
        images : ndarray
            Frames (N, H, W) (one (H, W) frame is taken as N = 1), or stacks
            (N, Z, H, W) for a 3D detector, in photon counts or detector units.
        progress : bool
            A progress bar (stderr).

        Returns
        -------
        pandas.DataFrame
            One row per localisation: ``frame`` (index into ``images``), ``x``, ``y``
            (pixels, origin at the centre of pixel (0, 0)), ``score``, plus optional
            columns (``sigma``; ``z`` in planes from the first plane for stacks).  Every
            candidate is returned: ``threshold`` is for the caller to apply.
        """
        ...

    def batch_frames(self, height: int, width: int) -> int:
        """Frames of ``height`` x ``width`` px that ``detect`` processes together (1: one at a time).

        Fed that many per call, counted from the first frame, a detector returns the same
        table to the bit as from one call on every frame
        (``models.recordings.predict.localise``).
        """
        ...


def empty_table(extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """A localisation table without rows: ``COLUMNS`` and the ``extra`` ones, with their dtypes."""
    cols = COLUMNS + list(extra)
    return pd.DataFrame({c: np.zeros(0, np.int64 if c == "frame" else np.float64) for c in cols})


def as_table(frame, x, y, score, **extra) -> pd.DataFrame:
    """Build a localisation table with the contract's column order and dtypes."""
    data = {
        "frame": np.asarray(frame, np.int64),
        "x": np.asarray(x, np.float64),
        "y": np.asarray(y, np.float64),
        "score": np.asarray(score, np.float64),
    }
    for key, value in extra.items():
        data[key] = np.asarray(value, np.float64)
    return pd.DataFrame(data)


def check_images(images) -> np.ndarray:
    """Accept (H, W) or (N, H, W) arrays; return (N, H, W) float32."""
    a = np.asarray(images)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (H, W), got shape {a.shape}")
    return a.astype(np.float32, copy=False)
