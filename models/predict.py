"""Run a detector on users' recordings: TIFF, .npy or a store -> a localisation CSV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from factory.errors import FactoryError
from factory.scan import frame_period_s, frame_schedule, scan_time_s
from factory.stores import Store, find_store, is_store_path

from .runs import load_model
from .trackpy_baseline import PAPER, PAPER_LABEL, TrackPyDetector


def read_images(path: str | Path) -> np.ndarray:
    """(N, H, W) float32 from a TIFF (one image or a T x H x W stack), .npy or a store."""
    path = Path(path)
    if not path.exists():
        raise FactoryError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            a = tifffile.imread(path)
        elif suffix == ".npy":
            a = np.load(path, allow_pickle=False)
        elif is_store_path(path):
            with Store(path) as st:
                a = st.read("images")
        else:
            raise FactoryError(f"{path}: unsupported input (use .tif/.tiff, .npy, .h5 or .zarr)")
    except FactoryError:
        raise
    except Exception as exc:  # a corrupt file can raise anything from the reader
        raise FactoryError(f"{path}: cannot read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] > 4:
        raise FactoryError(f"{path}: looks like a colour image {a.shape}; give single-channel frames (H x W or T x H x W)")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise FactoryError(f"{path}: expected one image (H x W) or a stack (T x H x W), got shape {a.shape}")
    if min(a.shape[1:]) < 8:
        raise FactoryError(f"{path}: images of {a.shape[1]} x {a.shape[2]} px are too small (at least 8 x 8)")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise FactoryError(f"{path}: pixel type {a.dtype} is not a real number type")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise FactoryError(f"{path}: contains NaN or infinite pixels")
    return a


def load_detector(spec: str | Path, device: str = "cpu"):
    """'trackpy' (the paper's settings), a TrackPy parameter JSON, or a model run folder."""
    if str(spec) == "trackpy":
        return TrackPyDetector(PAPER, label=PAPER_LABEL)
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        return TrackPyDetector.from_json(p)
    if not p.exists():
        raise FactoryError(f"{p}: no such model (a run folder from `factory train`, a trackpy.json, or 'trackpy')")
    return load_model(p, device)


@dataclass(frozen=True)
class ScanTiming:
    """The laser's timing, to stamp each localisation with the time it was seen."""

    dwell_us: float = 2.0
    line_retrace_ms: float = 1.1
    frame_flyback_ms: float | None = None  # None: one line retrace
    bidirectional: bool = False
    source: str = "the seed paper's defaults"

    @classmethod
    def of_store_config(cls, dataset: dict, source: str) -> "ScanTiming":
        scan, movie = dataset["scan"], dataset.get("movie") or {}
        return cls(scan["dwell_us"], scan["line_retrace_ms"], movie.get("frame_flyback_ms"),
                   scan["direction"] == "bidirectional", source)

    def describe(self) -> str:
        fly = self.line_retrace_ms if self.frame_flyback_ms is None else self.frame_flyback_ms
        return (f"dwell {self.dwell_us:g} us, line retrace {self.line_retrace_ms:g} ms, frame flyback {fly:g} ms, "
                f"{'bidirectional' if self.bidirectional else 'unidirectional'} (from {self.source})")


def training_timing(run_dir: Path) -> ScanTiming | None:
    """The scan timing of the store a model was trained on, if it is still there."""
    from .runs import RunFolder

    try:
        cfg = RunFolder(run_dir).read_config()
        path = find_store(cfg.data, cfg.train)
        with Store(path) as st:
            return ScanTiming.of_store_config(st.config["dataset"], f"the training data {path}")
    except (FactoryError, TypeError, KeyError):
        return None


def time_stamps(table: pd.DataFrame, height: int, width: int, timing: ScanTiming, stamps: str,
                frame_start_s: np.ndarray | None = None) -> np.ndarray:
    """``t_s`` of every localisation, from the start of the recording.

    ``stamps="scan"`` (what the laser saw: exposure-target models, TrackPy): frame start +
    the scan time at the localisation.  ``stamps="frame"`` (centroid-target models): frame
    start + the frame's mean pixel time, the time of a whole-frame centroid.  Frames
    follow each other every H W dwell + (H - 1) retrace + flyback unless
    ``frame_start_s`` gives each frame's start."""
    sched = frame_schedule(height, width, timing.dwell_us, timing.line_retrace_ms, timing.bidirectional,
                           timing.frame_flyback_ms)
    frame = table["frame"].to_numpy()
    starts = frame * frame_period_s(sched) if frame_start_s is None else np.asarray(frame_start_s)[frame]
    if stamps == "frame":
        return starts + sched.start_s.mean()
    return starts + scan_time_s(table["x"], table["y"], height, width, timing.dwell_us, timing.line_retrace_ms,
                                timing.bidirectional)


def predict(detector, images: np.ndarray, pixel_size_um: float | None = None,
            progress: bool = False, timing: ScanTiming | None = None,
            frame_start_s: np.ndarray | None = None) -> pd.DataFrame:
    """Localise, then add ``t_s`` (with ``timing``) and micrometre columns (with
    ``pixel_size_um``)."""
    table = detector.detect(images, progress=progress)
    if timing is not None:
        stamps = getattr(detector, "timestamps", "scan")
        table.insert(1, "t_s", time_stamps(table, images.shape[1], images.shape[2], timing, stamps, frame_start_s))
    if pixel_size_um is not None:
        table["x_um"] = table["x"] * pixel_size_um
        table["y_um"] = table["y"] * pixel_size_um
        if "sigma" in table:
            table["sigma_um"] = table["sigma"] * pixel_size_um
    return table
