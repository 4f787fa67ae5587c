"""Run a detector on users' recordings: TIFF, .npy or a store -> a localisation CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from factory.errors import FactoryError
from factory.stores import Store, find_store, is_store_path

from .base import Detector
from .recording import Recording, as_recording, check_frames, check_pixels, check_tiff_pages, open_recording
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
                check_tiff_pages(tf, path)
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
    check_pixels(a, path)
    return a.astype(np.float32)


def _check_frames(a: np.ndarray, path: Path, what: str) -> None:
    """Refuse an array with no frames (or stacks) in it."""
    check_frames(a.shape, path, what)


def read_images(path: str | Path) -> np.ndarray:
    """(N, H, W) float32 from a TIFF (one image or a T x H x W stack), .npy or a store,
    whole; ``open_recording`` reads it a chunk at a time."""
    with open_recording(path) as rec:
        return rec.read()


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
    # Imported here: the network registry imports torch, which TrackPy never needs.
    from .runs import RunFolder, load_model

    if prefer is not None and p.is_dir():
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


def localise(detector: Detector, images: np.ndarray | Recording, progress: bool = False,
             min_score: float | None = None) -> pd.DataFrame:
    """``detector.detect`` over a recording (or an (N, H, W) array), a chunk of frames at a
    time: the same table as one call on all the frames, in the memory of one chunk, less
    the localisations scored below ``min_score`` (dropped as they come: a long recording
    has millions of faint candidates).

    A network sees the same batches as in one call (its ``batch_frames`` per forward
    pass, counted from the first frame), so its outputs are the same to the bit.  The
    progress bar counts frames, with frames/s."""
    from tqdm.auto import tqdm

    rec = images if isinstance(images, Recording) else as_recording(images)
    n, h, w = rec.shape
    step = detector.batch_frames(h, w)
    parts, empty = [], None
    with tqdm(total=n, desc=detector.name, unit="frame", disable=not progress) as bar:
        for start, chunk in rec.chunks(step):
            for a in range(0, len(chunk), step):
                table = detector.detect(chunk[a:a + step], progress=False)
                if min_score is not None:
                    table = table[table["score"] >= min_score].reset_index(drop=True)
                if len(table):
                    table["frame"] += start + a
                    parts.append(table)
                elif empty is None:
                    empty = table
                bar.update(len(chunk[a:a + step]))
    if not parts:
        return empty if empty is not None else detector.detect(np.zeros((0, h, w), np.float32))
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def predict(detector: Detector, images: np.ndarray | Recording, pixel_size_um: float | None = None,
            progress: bool = False, timing: ScanTiming | None = None,
            frame_start_s: np.ndarray | None = None, min_score: float | None = None) -> pd.DataFrame:
    """Localise (``localise``: chunk by chunk, keeping scores from ``min_score``), then add
    ``t_s`` (with ``timing``) and micrometre columns (with ``pixel_size_um``)."""
    table = localise(detector, images, progress=progress, min_score=min_score)
    if timing is not None:
        _, h, w = images.shape
        table.insert(1, "t_s", time_stamps(table, h, w, timing, detector.timestamps, frame_start_s))
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
