"""The TrackPy baseline: ``trackpy.locate`` per image, scored by integrated mass.

Two settings are reported: the paper's (``PAPER``: diameter 7, separation 7, no
preprocessing), and the fair baseline, tuned by a grid search on the validation data
only (never on a test set) and saved as JSON beside the evaluation.
"""

from __future__ import annotations

import itertools
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError

from factory.config import StrictModel
from factory.errors import FactoryError

from models.detectors.base import as_table, check_images, empty_table

if TYPE_CHECKING:  # the metrics (Numba, SciPy) are imported by tuning only, not to localise
    from models.evaluation.metrics import Points

log = logging.getLogger(__name__)

LABEL = "TrackPy (ours, tuned on val)"
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
    """``trackpy.locate`` settings (pixels)."""

    diameter: Annotated[int, Field(ge=3, le=99)] = 7  # odd, as trackpy requires
    minmass: Annotated[float, Field(ge=0)] = 0.0
    separation: Optional[Annotated[float, Field(gt=0)]] = None  # trackpy's default: diameter + 1
    percentile: Annotated[float, Field(ge=0, le=100)] = 64.0
    preprocess: bool = True

# The seed paper's TrackPy (Methods 4.8): diameter 7 and separation 7 px, no band-pass
# preprocessing, mass as the score.
PAPER = Params(diameter=7, separation=7.0, preprocess=False)


class TrackPyDetector:
    """Intensity-based localisation (Crocker-Grier, as implemented by TrackPy)."""

    name = "trackpy"
    ndim = 2
    target = "centroid"  # scored against the paper's truth first (both where a store has both)
    timestamps = "scan"  # an intensity peak is where the laser saw the particle
    z_step_um = None

    def __init__(self, params: Params | None = None, threshold: float | None = None,
                 label: str = LABEL):
        self.params = params or Params()
        # Mass above which a localisation counts for F1 (the AUCs rank every one).
        self.threshold = threshold
        self.label = label

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
        return cls(params, threshold, data.get("label", LABEL))

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        data = {"detector": self.name, "label": self.label, "params": self.params.model_dump(),
                "threshold": self.threshold}
        Path(path).write_text(json.dumps({**data, **(extra or {})}, indent=2))

    def detect(self, images, progress: bool = False) -> pd.DataFrame:
        from tqdm.auto import tqdm

        trackpy = import_trackpy()
        images = check_images(images)
        p = self.params
        frames, xs, ys, masses, sizes = [], [], [], [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in tqdm(range(len(images)), desc="trackpy", unit="img", disable=not progress):
                f = trackpy.locate(
                    images[i], p.diameter, minmass=p.minmass, separation=p.separation,
                    percentile=p.percentile, preprocess=p.preprocess,
                )
                if len(f):
                    frames.append(np.full(len(f), i))
                    xs.append(f["x"].to_numpy())
                    ys.append(f["y"].to_numpy())
                    masses.append(f["mass"].to_numpy())
                    sizes.append(f["size"].to_numpy())
        if not frames:
            return empty_table(("sigma",))
        # TrackPy's `size` is the radius of gyration of the spot, in px: a spread, not an
        # uncertainty, but the closest thing it reports.
        return as_table(np.concatenate(frames), np.concatenate(xs), np.concatenate(ys),
                        np.concatenate(masses), sigma=np.concatenate(sizes))

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


def _f1_threshold(table: pd.DataFrame, gt: Points, pixel_size_um: float) -> float:
    from models.evaluation.metrics import F1_GATE_NM, best_f1_threshold, nm_to_px

    return best_f1_threshold(table.frame, table[["x", "y"]].to_numpy(), table.score, gt,
                             nm_to_px(F1_GATE_NM, pixel_size_um))


def operating_point(det: TrackPyDetector, images: np.ndarray, gt: Points, pixel_size_um: float) -> float:
    """The mass threshold maximising F1 on tuning data (for fixed parameters)."""
    return _f1_threshold(det.detect(images), gt, pixel_size_um)


def tune(images: np.ndarray, gt: Points, pixel_size_um: float,
         grid: dict | None = None) -> tuple[TrackPyDetector, list[dict]]:
    """Grid search maximising the mean PR-AUC over the three gates on tuning data.

    Returns the tuned detector and every grid point's scores.  Its F1 threshold (a
    mass) is the one that maximises F1 on the same data.
    """
    from models.evaluation.metrics import GATES_NM, Points, nm_to_px, pr_auc

    grid = {**DEFAULT_GRID, **(grid or {})}
    gates_px = [nm_to_px(g, pixel_size_um) for g in GATES_NM]
    results = []
    keys = list(grid)
    best, best_score, best_table = None, -1.0, None
    for values in itertools.product(*(grid[k] for k in keys)):
        params = Params(**dict(zip(keys, values)))
        table = TrackPyDetector(params).detect(images)
        pred = Points.from_arrays(table.frame, table.x, table.y, len(images))
        aucs = [pr_auc(pred, table.score.to_numpy(), gt, g) for g in gates_px]
        score = float(np.mean(aucs))
        results.append({**params.model_dump(), "auc": aucs, "mean_auc": score})
        log.info("trackpy %s: mean AUC %.3f", params, score)
        if score > best_score:
            best, best_score, best_table = params, score, table
    return TrackPyDetector(best, _f1_threshold(best_table, gt, pixel_size_um)), results


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


def tune_user_pipeline(frames: np.ndarray, gt: Points, pixel_size_um: float, sigma_xy_um: float,
                       search_range_px: float) -> UserPipeline:
    """The diameter (odd, 2.5 - 4.5 PSF sigmas, where a user looking at the spots would
    set it) and the ``minmass`` that maximise F1 on a tuning movie with truth."""
    from models.evaluation.metrics import F1_GATE_NM, Points, f1_rmse, nm_to_px

    s = sigma_xy_um / pixel_size_um
    lo, hi = max(3, int(round(2.5 * s)) | 1), max(3, int(round(4.5 * s)) | 1)
    gate = nm_to_px(F1_GATE_NM, pixel_size_um)
    best = (-1.0, lo, 0.0)
    for d in range(lo, hi + 1, 2):
        f = _user_locate(frames, d, 0.0)
        table = pd.DataFrame({"frame": f["frame"].to_numpy(np.int64), "x": f["x"], "y": f["y"], "score": f["mass"]})
        cut = _f1_threshold(table, gt, pixel_size_um)
        keep = table["score"].to_numpy() >= cut
        f1, _ = f1_rmse(Points(table["frame"].to_numpy()[keep], table[["x", "y"]].to_numpy()[keep], gt.n_frames),
                        gt, gate)
        log.info("trackpy user pipeline: diameter %d, minmass %.1f: F1 %.3f", d, cut, f1)
        if f1 > best[0]:
            best = (f1, d, cut)
    return UserPipeline(diameter=best[1], minmass=best[2], search_range_px=search_range_px)


def _user_locate(frames: np.ndarray, diameter: int, minmass: float) -> pd.DataFrame:
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
    f = _user_locate(frames, pipe.diameter, pipe.minmass)
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


# --- z-stacks -----------------------------------------------------------------------------

LABEL_3D = "TrackPy 3D (ours, tuned on val)"


class Params3D(StrictModel):
    """``trackpy.locate`` on whole (Z, H, W) stacks: anisotropic diameters (odd), in
    planes along z and pixels in x and y."""

    diameter_xy: Annotated[int, Field(ge=3, le=99)] = 9
    diameter_z: Annotated[int, Field(ge=3, le=99)] = 5
    minmass: Annotated[float, Field(ge=0)] = 0.0
    percentile: Annotated[float, Field(ge=0, le=100)] = 64.0
    preprocess: bool = True


class TrackPy3DDetector:
    """Crocker-Grier in 3D (``trackpy.locate`` with diameters (z, y, x)), scored by mass.

    ``detect`` takes (N, Z, H, W) stacks and returns ``frame, x, y, z, score, sigma``
    with x, y in pixels and z in planes from the first plane."""

    name = "trackpy3d"
    ndim = 3
    target = "centroid"
    timestamps = "scan"  # as in 2D: an intensity peak is where the laser saw the particle
    z_step_um = None  # diameters in planes: any z step

    def __init__(self, params: Params3D | None = None, threshold: float | None = None, label: str = LABEL_3D):
        self.params = params or Params3D()
        self.threshold = threshold
        self.label = label

    save = TrackPyDetector.save  # the same parameter file
    batch_frames = TrackPyDetector.batch_frames

    def detect(self, stacks, progress: bool = False) -> pd.DataFrame:
        from tqdm.auto import tqdm

        trackpy = import_trackpy()
        p = self.params
        d = (p.diameter_z, p.diameter_xy, p.diameter_xy)
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in tqdm(range(len(stacks)), desc="trackpy 3D", unit="stack", disable=not progress):
                f = trackpy.locate(np.asarray(stacks[i], np.float64), d, minmass=p.minmass,
                                   percentile=p.percentile, preprocess=p.preprocess)
                if len(f):
                    rows.append(pd.DataFrame({"frame": i, "x": f["x"].to_numpy(), "y": f["y"].to_numpy(),
                                              "z": f["z"].to_numpy(), "score": f["mass"].to_numpy(),
                                              "sigma": f["size_x"].to_numpy() if "size_x" in f else np.nan}))
        if not rows:
            return pd.DataFrame({c: pd.Series(dtype=float) for c in ("frame", "x", "y", "z", "score", "sigma")})
        return pd.concat(rows, ignore_index=True)


DEFAULT_GRID_3D = {
    "diameter_xy": [7, 9, 11],
    "diameter_z": [3, 5, 7],
    "minmass": [0.0],
    "percentile": [64.0],
    "preprocess": [True, False],
}
