"""Run a detector on users' recordings: TIFF, .npy or a store -> a localisation CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from factory.errors import FactoryError
from factory.stores import Store, find_store, is_store_path

from .runs import load_model
from .timing import ScanTiming, time_stamps
from .trackpy_baseline import PAPER, PAPER_LABEL, TrackPyDetector


def _read_array(path: Path) -> np.ndarray:
    """The pixel array of a TIFF (every page one size), .npy or store, unchecked."""
    if not path.exists():
        raise FactoryError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                shapes = {tuple(p.shape) for p in tf.pages}
                if len(shapes) > 1:
                    raise FactoryError(f"{path}: frames of different sizes ({', '.join('x'.join(map(str, sh)) for sh in sorted(shapes))}); "
                                       "a recording's frames must all have one size")
                return np.asarray(tf.asarray())
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if is_store_path(path):
            with Store(path) as st:
                return st.read("images")
    except FactoryError:
        raise
    except Exception as exc:  # a corrupt file can raise anything from the reader
        raise FactoryError(f"{path}: cannot read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    raise FactoryError(f"{path}: unsupported input (use .tif/.tiff, .npy, .h5 or .zarr)")


def _as_pixels(a: np.ndarray, path: Path) -> np.ndarray:
    """float32 pixels, after checking the type and that every pixel is finite and fits."""
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise FactoryError(f"{path}: pixel type {a.dtype} is not a real number type")
    if np.issubdtype(a.dtype, np.floating):
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if nan or inf:
            what = " and ".join(f"{k} {name}" for k, name in ((nan, "NaN"), (inf, "infinite")) if k)
            raise FactoryError(f"{path}: {what} pixel value(s); every pixel must be a finite number")
        big = float(np.abs(a).max()) if a.size else 0.0
        limit = float(np.finfo(np.float32).max)
        if big > limit:
            raise FactoryError(f"{path}: pixel values up to {big:.3g} do not fit in 32-bit floats (at most "
                               f"{limit:.3g}); rescale the recording")
    return a.astype(np.float32)


def _check_frames(a: np.ndarray, path: Path, what: str) -> None:
    """Refuse an array with no frames (or stacks) in it."""
    if a.size == 0:
        if a.ndim and a.shape[0] == 0:
            raise FactoryError(f"{path}: holds no {what} (array of shape {a.shape})")
        raise FactoryError(f"{path}: {what} without pixels (array of shape {a.shape})")


def read_images(path: str | Path) -> np.ndarray:
    """(N, H, W) float32 from a TIFF (one image or a T x H x W stack), .npy or a store."""
    path = Path(path)
    a = _read_array(path)
    _check_frames(a, path, "images")
    if a.ndim == 3 and a.shape[-1] in (3, 4) and min(a.shape[:2]) >= 8:
        # H x W x 3 (or 4) is a colour image; as T x H x W it would be frames 3 px wide.
        raise FactoryError(f"{path}: shape {a.shape} looks like a colour image ({a.shape[0]} x {a.shape[1]} px, "
                           f"{a.shape[2]} channels) or frames only {a.shape[2]} px wide; give single-channel "
                           "frames of at least 8 x 8 px (H x W or T x H x W)")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise FactoryError(f"{path}: expected one image (H x W) or a stack (T x H x W), got shape {a.shape}")
    if min(a.shape[1:]) < 8:
        raise FactoryError(f"{path}: images of {a.shape[1]} x {a.shape[2]} px are too small (at least 8 x 8)")
    return _as_pixels(a, path)


def load_detector(spec: str | Path, device: str = "cpu", prefer: str | None = None):
    """'trackpy' (the paper's settings), a TrackPy parameter JSON, or a model run folder
    (of a network with a head per target: the ``prefer`` head, else its first)."""
    if str(spec) == "trackpy":
        return TrackPyDetector(PAPER, label=PAPER_LABEL)
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        return TrackPyDetector.from_json(p)
    if not p.exists():
        raise FactoryError(f"{p}: no such model (a run folder from `factory train`, a trackpy.json, or 'trackpy')")
    if prefer is not None and p.is_dir():
        from .runs import RunFolder

        try:
            targets = RunFolder(p).read_config().targets
        except FactoryError:
            targets = ()
        if prefer in targets:
            return load_model(p, device, target=prefer)
    return load_model(p, device)


def training_data_config(run_dir: Path) -> tuple[dict | None, str | None]:
    """The dataset config of the store a model was trained on, if it is still there."""
    from .runs import RunFolder

    try:
        cfg = RunFolder(run_dir).read_config()
        path = find_store(cfg.data, cfg.train)
        with Store(path) as st:
            return st.config["dataset"], f"the training data {path}"
    except (FactoryError, TypeError, KeyError):
        return None, None


def training_timing(run_dir: Path) -> ScanTiming | None:
    """The scan timing of the store a model was trained on, if it is still there."""
    cfg, source = training_data_config(run_dir)
    return ScanTiming.of_store_config(cfg, source) if cfg else None


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


def tiff_z_step_um(path: Path) -> float | None:
    """The z step a TIFF records: ImageJ's ``spacing`` or OME's ``PhysicalSizeZ`` (um)."""
    import re

    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            ij = tf.imagej_metadata or {}
            if "spacing" in ij and str(ij.get("unit", "micron")).lower() in ("micron", "um", "µm", "\\u00b5m"):
                return float(ij["spacing"])
            ome = tf.ome_metadata or ""
    except Exception:  # unreadable metadata: the caller asks for --z-step-um
        return None
    m = re.search(r'PhysicalSizeZ="([0-9.eE+-]+)"', ome)
    unit = re.search(r'PhysicalSizeZUnit="([^"]+)"', ome)
    if m and (unit is None or unit.group(1) in ("µm", "um", "micron")):
        return float(m.group(1))
    return None


def read_stacks(path: str | Path) -> np.ndarray:
    """(N, Z, H, W) float32 from a TIFF (one Z x H x W stack, or T x Z x H x W), .npy or
    a stack store."""
    path = Path(path)
    a = _read_array(path)
    _check_frames(a, path, "stacks")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise FactoryError(f"{path}: a 3D model needs a z-stack (Z x H x W, or T x Z x H x W), "
                           f"got an array of shape {a.shape}")
    if a.shape[1] < 3 or min(a.shape[2:]) < 8:
        raise FactoryError(f"{path}: stacks of {a.shape[1]} planes of {a.shape[2]} x {a.shape[3]} px are too small "
                           "(at least 3 planes of 8 x 8 px)")
    return _as_pixels(a, path)
