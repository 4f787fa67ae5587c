"""The TrackPy baseline: ``trackpy.locate`` per image, scored by integrated mass.

Two settings are reported: the paper's (``PAPER``: diameter 7, separation 7, no
preprocessing), and the fair baseline, tuned by a grid search on the validation data
only (never on a test set) and saved as JSON beside the evaluation.
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


_trackpy_ready = False


def import_trackpy():
    """``trackpy``, quiet, with its Numba functions cached on disk.

    TrackPy compiles its Numba functions (sub-pixel refinement, subnetwork linking) on
    first use in every process, without caching them: about a second of every
    ``factory track`` or ``predict`` call, longer than tracking a short recording takes.
    Cached (Numba's own cache, beside TrackPy or in the user's cache folder), the same
    machine code is loaded instead of compiled again; results are unchanged."""
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
    """``trackpy.locate`` settings, a diameter per axis as TrackPy takes them: ``diameter``
    in x and y (pixels), and for z-stacks ``diameter_z`` along z (planes; None: images)."""

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
    """Intensity-based localisation (Crocker-Grier, as implemented by TrackPy), scored
    by integrated mass: ``trackpy.locate`` on each image (N, H, W), or with
    ``diameter_z`` on each z-stack (N, Z, H, W), returning ``z`` in planes from the
    first plane as the 3D networks do."""

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
        return 2 if self.params.diameter_z is None else 3

    @classmethod
    def from_json(cls, path: str | Path) -> "TrackPyDetector":
        """Parameters saved by an earlier evaluation (``trackpy.json``), checked."""
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
        data = {"detector": self.name, "label": self.label, "params": self.params.model_dump(),
                "threshold": self.threshold}
        Path(path).write_text(json.dumps({**data, **(extra or {})}, indent=2))

    def detect(self, images, progress: bool = False) -> pd.DataFrame:
        from tqdm.auto import tqdm

        trackpy = import_trackpy()
        p = self.params
        images = check_images(images, self.ndim, "TrackPy 3D")
        diameter = p.diameter if self.ndim == 2 else (p.diameter_z, p.diameter, p.diameter)
        axes = ("x", "y", "z")[:self.ndim]
        frames, pos, masses, sizes = [], [], [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in tqdm(range(len(images)), desc=self.name, unit="img" if self.ndim == 2 else "stack",
                          disable=not progress):
                image = images[i] if self.ndim == 2 else images[i].astype(np.float64)
                f = trackpy.locate(image, diameter, minmass=p.minmass, separation=p.separation,
                                   percentile=p.percentile, preprocess=p.preprocess)
                if len(f):
                    frames.append(np.full(len(f), i))
                    pos.append(f[list(axes)].to_numpy())
                    masses.append(f["mass"].to_numpy())
                    # TrackPy's `size` is the radius of gyration of the spot, in px: a
                    # spread, not an uncertainty, but the closest thing it reports.
                    sizes.append(f["size" if "size" in f else "size_x"].to_numpy())
        if not frames:
            return localisations([], np.zeros((0, self.ndim)), [])
        return localisations(np.concatenate(frames), np.concatenate(pos), np.concatenate(masses),
                             np.concatenate(sizes))

    def batch_frames(self, height: int, width: int) -> int:
        """1: ``trackpy.locate`` takes one image (or stack) at a time."""
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
    """The grid ``models.evaluation.tuning.tune_trackpy`` searches for images or stacks."""
    return DEFAULT_GRID if ndim == 2 else DEFAULT_GRID_3D


# --- movies: the pipeline a TrackPy user runs (SPEC, "A baseline as users run it") -------

USER_MEMORY = 3  # frames a feature may vanish (blinking, a missed frame) and be linked
USER_MIN_FRAMES = 10  # trackpy.filter_stubs: shorter tracks are dropped
USER_MSD_LAGS = 4  # D from a line fit to trackpy.imsd over the first lags


class UserPipeline(StrictModel):
    """TrackPy on a movie as a competent user sets it up: ``trackpy.batch`` with its
    band-pass, a ``minmass`` cut, ``trackpy.link`` with ``adaptive_stop``,
    ``filter_stubs`` and a line fit to ``trackpy.imsd``."""

    diameter: Annotated[int, Field(ge=3, le=99)]
    minmass: Annotated[float, Field(ge=0)]
    search_range_px: Annotated[float, Field(gt=0)]
    memory: Annotated[int, Field(ge=0)] = USER_MEMORY
    min_frames: Annotated[int, Field(ge=2)] = USER_MIN_FRAMES
    msd_lags: Annotated[int, Field(ge=2)] = USER_MSD_LAGS


def user_search_range_px(max_diffusion_um2_s: float, frame_period_s: float, pixel_size_um: float) -> float:
    """The radius a user picks for the fastest particles expected: three standard
    deviations of their step per axis (99% of 2D steps fall inside)."""
    return 3.0 * float(np.sqrt(2.0 * max_diffusion_um2_s * frame_period_s)) / pixel_size_um


def user_locate(frames: np.ndarray, diameter: int, minmass: float) -> pd.DataFrame:
    """``trackpy.batch`` on the frames as the recording holds them (integer frames keep
    their type: TrackPy's band-pass threshold and mass scale depend on it)."""
    trackpy = import_trackpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trackpy.batch(np.asarray(frames), diameter, minmass=minmass, preprocess=True, processes=1)


def run_user_pipeline(frames: np.ndarray, pipe: UserPipeline, pixel_size_um: float,
                      frame_period_s: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tracks (``frame, x, y, track``) and D per track (``track, D_um2_s``: a line
    ``MSD = 4 D t + c`` fitted to ``trackpy.imsd`` over the first ``msd_lags`` lags)."""
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
