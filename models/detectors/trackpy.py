"""The TrackPy baseline: ``trackpy.locate`` per image (or z-stack), scored by integrated mass.

The images are located by ``trackpy.batch`` in TrackPy's default worker processes (one
per core), as a user runs it; every image gets the same ``trackpy.locate`` as in one
process, so the features are the same.

Two settings are reported: the paper's (``PAPER``: diameter 7, separation 7, no
preprocessing), and the fair baseline, tuned by a grid search on the validation data
only (never on a test set) and saved as JSON beside the evaluation.  For movies, the
pipeline a TrackPy user runs (``UserPipeline``, ``run_user_pipeline``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError

from factory.config import StrictModel
from factory.errors import FactoryError

from models.detectors.base import check_images, localisations

log = logging.getLogger(__name__)

LABEL = "TrackPy (ours, tuned on val)"
LABEL_3D = "TrackPy 3D (ours, tuned on val)"
PAPER_LABEL = "TrackPy (ours, paper settings)"
# trackpy.batch's own default since v0.5: one worker process per core.  A user who calls
# it without ``processes`` gets this, so the baseline does too (one process cost it about
# a third of its locate rate on 256 x 256 px frames of a 2-core machine).
USER_PROCESSES = "auto"
# Images per trackpy.batch call (the progress bar moves between calls), and the fewest
# images worth starting worker processes for (each call forks them: about 0.1 s).
CHUNK_IMAGES = 1000
PARALLEL_IMAGES = 64


_trackpy_ready = False


def import_trackpy():
    """``trackpy``, quiet, with its Numba functions cached on disk.

    TrackPy compiles its Numba functions (sub-pixel refinement, subnetwork linking) on
    first use in every process, without caching them: about a second of every
    ``factory track`` or ``predict`` call, longer than tracking a short recording takes.
    Cached (Numba's own cache, beside TrackPy or in the user's cache folder), the same
    machine code is loaded instead of compiled again; results are unchanged.

    Returns
    -------
    module
        The ``trackpy`` module, set up on the first call of the process.
    """
    global _trackpy_ready
    import trackpy

    if not _trackpy_ready:
        trackpy.quiet()
        try:
            from trackpy import try_numba

            if try_numba.NUMBA_AVAILABLE:
                for f in try_numba._registered_functions:
                    f.compiled.enable_caching()
        except (AttributeError, ImportError, OSError, RuntimeError):  # another TrackPy, or nowhere to cache
            pass
        _trackpy_ready = True
    return trackpy


class Params(StrictModel):
    """``trackpy.locate`` settings, a diameter per axis as TrackPy takes them.

    Attributes
    ----------
    diameter : int
        Spot diameter in x and y (px, 3 - 99; odd, as TrackPy requires).
    diameter_z : int or None
        For z-stacks, the diameter along z (planes, 3 - 99, odd); None: images.
    minmass : float
        Smallest integrated brightness kept (image units).
    separation : float or None
        Smallest distance between features (px); None: TrackPy's default, diameter + 1.
    percentile : float
        A feature's peak must be brighter than this percentile of the image's pixels
        (0 - 100).
    preprocess : bool
        TrackPy's band-pass filter before locating.
    """

    diameter: Annotated[int, Field(ge=3, le=99)] = 7  # odd, as trackpy requires
    diameter_z: Optional[Annotated[int, Field(ge=3, le=99)]] = None
    minmass: Annotated[float, Field(ge=0)] = 0.0
    separation: Optional[Annotated[float, Field(gt=0)]] = None  # trackpy's default: diameter + 1
    percentile: Annotated[float, Field(ge=0, le=100)] = 64.0
    preprocess: bool = True

# The seed paper's TrackPy (Methods 4.8): diameter 7 and separation 7 px, no band-pass
# preprocessing, mass as the score.
PAPER = Params(diameter=7, separation=7.0, preprocess=False)


class TrackPyDetector:
    """Intensity-based localisation (Crocker-Grier, as implemented by TrackPy), scored by integrated mass.

    ``trackpy.locate`` on each image (N, H, W), or with ``diameter_z`` on each z-stack
    (N, Z, H, W), returning ``z`` in planes from the first plane as the 3D networks do.
    A ``models.detectors.base.Detector``.

    Parameters
    ----------
    params : Params, optional
        The locate settings (default: ``Params()``); ``diameter_z`` makes it 3D.
    threshold : float, optional
        Mass above which a localisation counts for F1 (the AUCs rank every one).
    label : str, optional
        Default: ``LABEL``, or ``LABEL_3D`` with ``diameter_z``.
    """

    name = "trackpy"
    target = "centroid"  # scored against the paper's truth first (both where a store has both)
    timestamps = "scan"  # an intensity peak is where the laser saw the particle
    z_step_um = None  # diameters in planes: any z step

    def __init__(self, params: Params | None = None, threshold: float | None = None,
                 label: str | None = None):
        self.params = params or Params()
        # Mass above which a localisation counts for F1 (the AUCs rank every one).
        self.threshold = threshold
        self.label = label or (LABEL if self.params.diameter_z is None else LABEL_3D)

    @property
    def ndim(self) -> int:
        """2 (images), or 3 (z-stacks) when ``params.diameter_z`` is set."""
        return 2 if self.params.diameter_z is None else 3

    @classmethod
    def from_json(cls, path: str | Path) -> "TrackPyDetector":
        """Parameters saved by an earlier evaluation (``trackpy.json``), checked.

        Parameters
        ----------
        path : str or Path
            A file written by ``save``.

        Returns
        -------
        TrackPyDetector
            Its ``params``, ``threshold`` (None when absent) and ``label`` (the default when
            absent).

        Raises
        ------
        FactoryError
            No such file, or not a TrackPy parameter file (not JSON, no valid ``params``, a
            threshold that is not a number).
        """
        path = Path(path)
        if not path.is_file():
            raise FactoryError(f"{path}: no such file")
        try:
            data = json.loads(path.read_text())
            params = Params.model_validate(data["params"])
            threshold = data.get("threshold")
            if threshold is not None and not isinstance(threshold, (int, float)):
                raise ValueError("threshold must be a number")
        except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FactoryError(f"{path}: not a TrackPy parameter file ({first})") from None
        return cls(params, threshold, data.get("label"))

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write the detector as JSON (``trackpy.json``), for ``from_json``.

        Parameters
        ----------
        path : str or Path
            The file written.
        extra : dict, optional
            More keys for the file (where and how it was tuned).
        """
        data = {"detector": self.name, "label": self.label, "params": self.params.model_dump(),
                "threshold": self.threshold}
        Path(path).write_text(json.dumps({**data, **(extra or {})}, indent=2))

    def detect(self, images, progress: bool = False, min_score: float | None = None) -> pd.DataFrame:
        """Localise particles in images (N, H, W), or in stacks (N, Z, H, W) where ``ndim`` is 3.

        Parameters
        ----------
        images : array_like
            Frames (N, H, W) (one (H, W) frame is taken as N = 1), or stacks (N, Z, H, W).
        progress : bool
            A progress bar (stderr) counting images or stacks.
        min_score : float, optional
            Leave out features of a smaller mass (``Detector.detect``).

        Returns
        -------
        pandas.DataFrame
            ``frame, x, y`` (px, origin at the centre of pixel (0, 0); stacks also ``z`` in
            planes from the first plane), ``score`` (TrackPy's integrated mass) and ``sigma``
            (TrackPy's ``size``, or ``size_x`` where the diameters differ per axis: the
            spot's radius of gyration in px).  Every feature ``trackpy.locate`` returns with
            ``params`` (of mass from ``min_score`` on, where given); ``threshold`` is not
            applied.

        Raises
        ------
        FactoryError
            A 3D detector given anything but stacks (N, Z, H, W).
        ValueError
            A 2D detector given anything but (N, H, W) or (H, W).
        """
        from tqdm.auto import tqdm

        trackpy = import_trackpy()
        p = self.params
        images = check_images(images, self.ndim, "TrackPy 3D")
        diameter = p.diameter if self.ndim == 2 else (p.diameter_z, p.diameter, p.diameter)
        axes = ("x", "y", "z")[:self.ndim]
        parts = []
        with warnings.catch_warnings(), tqdm(total=len(images), desc=self.name, disable=not progress,
                                             unit="img" if self.ndim == 2 else "stack") as bar:
            warnings.simplefilter("ignore")
            for a in range(0, len(images), CHUNK_IMAGES):
                chunk = images[a:a + CHUNK_IMAGES]
                if self.ndim == 3:
                    chunk = chunk.astype(np.float64)
                # trackpy.batch runs the same trackpy.locate on every image, in worker processes
                # (TrackPy's default) where the chunk holds enough images to repay starting them.
                processes = USER_PROCESSES if len(chunk) >= PARALLEL_IMAGES else 1
                f = trackpy.batch(chunk, diameter, minmass=p.minmass, separation=p.separation,
                                  percentile=p.percentile, preprocess=p.preprocess, processes=processes)
                if len(f):
                    parts.append(f.assign(frame=f["frame"].to_numpy() + a))
                bar.update(len(chunk))
        if not parts:
            return localisations([], np.zeros((0, self.ndim)), [])
        f = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        if min_score is not None:
            f = f[f["mass"].to_numpy() >= min_score]
        # TrackPy's `size` is the radius of gyration of the spot, in px: a spread, not an
        # uncertainty, but the closest thing it reports.
        return localisations(f["frame"].to_numpy(), f[list(axes)].to_numpy(), f["mass"].to_numpy(),
                             f["size" if "size" in f else "size_x"].to_numpy())

    def batch_frames(self, height: int, width: int) -> int:
        """1: ``trackpy.locate`` takes one image (or stack) at a time.

        Parameters
        ----------
        height, width : int
            The frame size (px); unused.

        Returns
        -------
        int
            1.
        """
        return 1


DEFAULT_GRID = {
    "diameter": [5, 7, 9],
    "minmass": [0.0],
    "separation": [None],
    "percentile": [50.0, 64.0, 80.0],
    "preprocess": [True, False],
}
DEFAULT_GRID_3D = {
    "diameter": [7, 9, 11],
    "diameter_z": [3, 5, 7],
    "minmass": [0.0],
    "percentile": [64.0],
    "preprocess": [True, False],
}


def default_grid(ndim: int) -> dict:
    """The grid ``models.evaluation.tuning.tune_trackpy`` searches for images or stacks.

    Parameters
    ----------
    ndim : {2, 3}
        2: images; 3: stacks.

    Returns
    -------
    dict
        ``Params`` field -> values: ``DEFAULT_GRID`` (2), else ``DEFAULT_GRID_3D``.
    """
    return DEFAULT_GRID if ndim == 2 else DEFAULT_GRID_3D


# --- movies: the pipeline a TrackPy user runs (SPEC, "A baseline as users run it") -------

USER_MEMORY = 3  # frames a feature may vanish (blinking, a missed frame) and be linked
USER_MIN_FRAMES = 10  # trackpy.filter_stubs: shorter tracks are dropped
USER_MSD_LAGS = 4  # D from a line fit to trackpy.imsd over the first lags


class UserPipeline(StrictModel):
    """TrackPy on a movie as a competent user sets it up.

    ``trackpy.batch`` with its band-pass, a ``minmass`` cut, ``trackpy.link`` with
    ``adaptive_stop``, ``filter_stubs`` and a line fit to ``trackpy.imsd``.

    Attributes
    ----------
    diameter : int
        Spot diameter (px, odd, 3 - 99).
    minmass : float
        Smallest integrated brightness kept (image units).
    search_range_px : float
        Linking radius (px).
    memory : int
        Frames a feature may vanish and still be linked.
    min_frames : int
        Shorter tracks are dropped (``filter_stubs``).
    msd_lags : int
        Lags of the MSD line fit.
    """

    diameter: Annotated[int, Field(ge=3, le=99)]
    minmass: Annotated[float, Field(ge=0)]
    search_range_px: Annotated[float, Field(gt=0)]
    memory: Annotated[int, Field(ge=0)] = USER_MEMORY
    min_frames: Annotated[int, Field(ge=2)] = USER_MIN_FRAMES
    msd_lags: Annotated[int, Field(ge=2)] = USER_MSD_LAGS


def user_search_range_px(max_diffusion_um2_s: float, frame_period_s: float, pixel_size_um: float) -> float:
    """The radius a user picks for the fastest particles expected.

    Three standard deviations of their step per axis (99% of 2D steps fall inside).

    Parameters
    ----------
    max_diffusion_um2_s : float
        The largest D expected (um^2/s).
    frame_period_s : float
        Time between frames (s).
    pixel_size_um : float
        Pixel size (um).

    Returns
    -------
    float
        ``3 * sqrt(2 D dt)`` in px.
    """
    return 3.0 * float(np.sqrt(2.0 * max_diffusion_um2_s * frame_period_s)) / pixel_size_um


def user_locate(frames: np.ndarray, diameter: int, minmass: float) -> pd.DataFrame:
    """``trackpy.batch`` on the frames as the recording holds them.

    Integer frames keep their type: TrackPy's band-pass threshold and mass scale depend
    on it.  Frames are located in ``USER_PROCESSES`` worker processes, TrackPy's default;
    the features are the same as from one process.

    Parameters
    ----------
    frames : ndarray
        A movie (N, H, W).
    diameter : int
        Spot diameter (px, odd).
    minmass : float
        Smallest integrated brightness kept.

    Returns
    -------
    pandas.DataFrame
        TrackPy's feature table (``frame``, ``x``, ``y`` in px, ``mass``, ...), band-pass
        preprocessing on.
    """
    trackpy = import_trackpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trackpy.batch(np.asarray(frames), diameter, minmass=minmass, preprocess=True,
                             processes=USER_PROCESSES)


def run_user_pipeline(frames: np.ndarray, pipe: UserPipeline, pixel_size_um: float,
                      frame_period_s: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tracks and D per track of a movie, as a TrackPy user gets them.

    Parameters
    ----------
    frames : ndarray
        A movie (N, H, W), as its recording holds it.
    pipe : UserPipeline
        The pipeline's settings.
    pixel_size_um : float
        Pixel size (um).
    frame_period_s : float
        Time between frames (s).

    Returns
    -------
    tracks : pandas.DataFrame
        ``frame, x, y, track`` (px), tracks of at least ``pipe.min_frames`` points.
    diffusion : pandas.DataFrame
        ``track, D_um2_s``: D (um^2/s) from a line ``MSD = 4 D t + c`` fitted to
        ``trackpy.imsd`` over the first ``msd_lags`` lags (NaN with fewer than two
        finite MSD values).
    """
    trackpy = import_trackpy()
    f = user_locate(frames, pipe.diameter, pipe.minmass)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(f) == 0:
            return (pd.DataFrame(columns=["frame", "x", "y", "track"]), pd.DataFrame(columns=["track", "D_um2_s"]))
        t = trackpy.link(f, pipe.search_range_px, memory=pipe.memory,
                         adaptive_stop=min(1.0, 0.5 * pipe.search_range_px), adaptive_step=0.9)
        t = trackpy.filter_stubs(t, pipe.min_frames)
        tracks = t[["frame", "x", "y", "particle"]].rename(columns={"particle": "track"}).reset_index(drop=True)
        if len(tracks) == 0:
            return tracks, pd.DataFrame(columns=["track", "D_um2_s"])
        msd = trackpy.imsd(t, pixel_size_um, 1.0 / frame_period_s, max_lagtime=pipe.msd_lags)
    lag = msd.index.to_numpy(np.float64)
    rows = []
    for track in msd.columns:
        y = msd[track].to_numpy(np.float64)
        ok = np.isfinite(y)
        d = np.polyfit(lag[ok], y[ok], 1)[0] / 4.0 if ok.sum() >= 2 else np.nan
        rows.append((int(track), float(d)))
    return tracks, pd.DataFrame(rows, columns=["track", "D_um2_s"])
