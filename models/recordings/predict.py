"""Run a detector on users' recordings: TIFF, .npy or a store -> a localisation table.

``predict_file`` is `factory predict`; ``load_detector`` is the one way to load a
detector (a run folder, a TrackPy parameter file, or TrackPy with the paper's settings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from factory.config import Dataset
from factory.errors import FactoryError
from factory.stores import Store, find_store, is_store_path

from models.detectors.base import Detector
from models.recordings.recording import (SETTINGS, Recording, as_recording, check_frames, check_pixels, check_settings,
                                         open_recording, open_tiff, pages_are_frames)
from models.tracking.timing import ScanTiming, time_stamps
from models.detectors.trackpy import PAPER, PAPER_LABEL, TrackPyDetector

log = logging.getLogger(__name__)

DETECT_PIXELS = 2**20  # pixels per detect call in ``localise`` (16 frames of 256 x 256 px)


def _read_array(path: Path) -> np.ndarray:
    """The pixel array of a TIFF (every page one size), .npy or store, unchecked."""
    if not path.exists():
        raise FactoryError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            with open_tiff(path) as tf:
                return np.asarray(tf.asarray(key=range(len(tf.pages))) if pages_are_frames(tf, path) else tf.asarray())
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
    """(N, H, W) float32 from a TIFF (one image or a T x H x W stack), .npy or a store, whole.

    ``open_recording`` reads it a chunk at a time.

    Parameters
    ----------
    path : str or Path
        The recording's file.

    Returns
    -------
    ndarray
        Every frame (N, H, W) as float32; one image reads as N = 1.

    Raises
    ------
    FactoryError
        As ``open_recording``: a missing, unsupported or unreadable file, or frames that
        are not finite real numbers of one size.
    """
    with open_recording(path) as rec:
        return rec.read()


def load_detector(spec: str | Path, device: str = "cpu", prefer: str | None = None,
                  precision: str = "float32") -> Detector:
    """A detector, ready to ``detect``.

    Parameters
    ----------
    spec : str or Path
        ``"trackpy"`` (TrackPy with the seed paper's settings), a TrackPy parameter file
        (``trackpy.json``, written by `factory evaluate`), or a model's run folder
        (`factory train`).
    device : str
        ``"cpu"`` or ``"cuda"``: where a network runs.
    prefer : {"centroid", "exposure"} or None
        A network with a head per target: the head to use (default: its first, the
        centroid).  Ignored by other detectors.
    precision : {"float32", "int8", "auto"}
        A network's inference arithmetic (``models.training.runs.RunFolder.detector``).
        Ignored by TrackPy.

    Returns
    -------
    Detector
        See ``models.detectors.base.Detector``: ``detect(images)`` takes (N, H, W) frames (3D
        models: (N, Z, H, W) stacks) and returns ``frame, x, y, score`` (+ ``sigma``) in
        pixels from the centre of pixel (0, 0); ``threshold`` is its tuned score cut.

    Raises
    ------
    FactoryError
        No such file or folder, a bad ``trackpy.json``, or a run folder whose model cannot
        be loaded.
    """
    if str(spec) == "trackpy":
        return TrackPyDetector(PAPER, label=PAPER_LABEL)
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        return TrackPyDetector.from_json(p)
    if not p.exists():
        raise FactoryError(f"{p}: no such model (a run folder from `factory train`, a trackpy.json, or 'trackpy')")
    # Imported here: the network registry imports torch, which TrackPy never needs.
    from models.training.runs import RunFolder, load_model

    if prefer is not None and p.is_dir():
        try:
            targets = RunFolder(p).read_config().targets
        except FactoryError:
            targets = ()
        if prefer in targets:
            return load_model(p, device, target=prefer, precision=precision)
    return load_model(p, device, precision=precision)


def training_datasets(run_dir: Path) -> tuple[list[Dataset], str | None]:
    """The typed dataset configs of the stores a model was trained on, those still there.

    A relative data folder is looked up from the working directory, then from the run
    folder upwards.

    Parameters
    ----------
    run_dir : Path
        The model's run folder.

    Returns
    -------
    datasets : list of factory.config.Dataset
        Each training store's ``Store.dataset``, in the order of the run's ``train``;
        empty when the run folder or none of its stores can be read.
    source : str or None
        ``"the training data <store paths>"``, for messages; None when ``datasets`` is
        empty.
    """
    from models.training.runs import RunFolder

    try:
        cfg = RunFolder(run_dir).read_config()
    except FactoryError:
        return [], None
    if cfg.data is None:  # a run folder written without a data folder (e.g. by the Python API)
        return [], None
    # A relative data folder is relative to where the model was trained: look from the
    # working directory, then from the run folder and each folder above it, so that a
    # command run elsewhere still finds it (runs/demo/model -> the project's data/); the
    # first place that holds any of the training stores is taken.
    data = Path(cfg.data)
    names = [cfg.train] if isinstance(cfg.train, str) else cfg.train
    run = Path(run_dir).resolve()
    places = [data] if data.is_absolute() else [data] + [p / data for p in (run, *run.parents)]
    for place in places:
        found, paths = [], []
        for name in names:
            try:
                path = find_store(place, name)
                with Store(path) as st:
                    found.append(st.dataset)
                paths.append(str(path))
            except (FactoryError, ValueError, KeyError):  # moved, unreadable, or a config this version cannot read
                continue
        if found:
            break
    return found, (f"the training data {', '.join(paths)}" if found else None)


def timing_of(datasets: list[Dataset], source: str | None) -> ScanTiming | None:
    """The scan timing of training data: its first movie store's, else its first store's.

    None when ``datasets`` is empty.  A movie store is preferred because it alone
    records the frame flyback.
    """
    if not datasets:
        return None
    return ScanTiming.of_dataset(next((d for d in datasets if d.movie is not None), datasets[0]), source)


def training_timing(run_dir: Path) -> ScanTiming | None:
    """The scan timing of the stores the model in ``run_dir`` was trained on (``timing_of``), or None."""
    return timing_of(*training_datasets(run_dir))


def localise(detector: Detector, images: np.ndarray | Recording, progress: bool = False,
             min_score: float | None = None) -> pd.DataFrame:
    """``detector.detect`` over a recording (or an (N, H, W) array), a chunk of frames at a time.

    The same table as one ``detector.detect(frames, min_score=min_score)`` call on all
    the frames, in the memory of one chunk, less the localisations scored below
    ``min_score`` (dropped as they come: a long recording has millions of faint
    candidates).

    A network sees the same batches as in one call (its ``batch_frames`` per forward
    pass, counted from the first frame), so its outputs are the same to the bit.  The
    progress bar counts frames, with frames/s.

    Parameters
    ----------
    detector : Detector
        A 2D detector.
    images : ndarray or Recording
        Frames (N, H, W) (or one (H, W) frame), or an open ``Recording``.
    progress : bool
        A progress bar (stderr).
    min_score : float, optional
        Keep localisations with ``score >= min_score`` (default: all).

    Returns
    -------
    pandas.DataFrame
        The detector's table (``frame`` counted from the first frame; x, y in px), with
        its columns even when empty.
    """
    from tqdm.auto import tqdm

    rec = images if isinstance(images, Recording) else as_recording(images)
    n, h, w = rec.shape
    step = detector.batch_frames(h, w)
    # Frames per detect call: whole batches, about DETECT_PIXELS (a table per call costs
    # about a millisecond; the progress bar still moves several times a second).
    group = step * max(1, DETECT_PIXELS // (step * h * w))
    parts, empty = [], None
    with tqdm(total=n, desc=detector.name, unit="frame", disable=not progress) as bar:
        for start, chunk in rec.chunks(step):
            for a in range(0, len(chunk), group):
                frames = chunk[a:a + group]
                table = detector.detect(frames, progress=False, min_score=min_score)
                if min_score is not None:
                    table = table[table["score"] >= min_score].reset_index(drop=True)
                if len(table):
                    table["frame"] += start + a
                    parts.append(table)
                elif empty is None:
                    empty = table
                bar.update(len(frames))
    if not parts:
        return empty if empty is not None else detector.detect(np.zeros((0, h, w), np.float32))
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def predict(detector: Detector, images: np.ndarray | Recording, pixel_size_um: float | None = None,
            progress: bool = False, timing: ScanTiming | None = None,
            frame_start_s: np.ndarray | None = None, min_score: float | None = None) -> pd.DataFrame:
    """Localise chunk by chunk, then add ``t_s`` and micrometre columns.

    ``localise`` keeps scores from ``min_score``; ``t_s`` is added with ``timing`` and the
    micrometre columns with ``pixel_size_um``.

    Parameters
    ----------
    detector : Detector
        A 2D detector; its ``timestamps`` choose the time of each localisation.
    images : ndarray or Recording
        Frames (N, H, W), or an open ``Recording``.
    pixel_size_um : float, optional
        Pixel size (um): adds ``x_um``, ``y_um`` and, where there is ``sigma``,
        ``sigma_um``.
    progress : bool
        A progress bar (stderr) counting frames.
    timing : ScanTiming, optional
        The recording's scan timing: adds ``t_s`` (s from the recording's first pixel)
        as the second column.
    frame_start_s : ndarray, optional
        Start (s) of every frame (default: frames one after the other, from ``timing``).
    min_score : float, optional
        Keep localisations with ``score >= min_score`` (default: all).

    Returns
    -------
    pandas.DataFrame
        ``frame, [t_s,] x, y, score, sigma`` (px), with ``x_um, y_um, sigma_um`` (um) when
        the pixel size is given.
    """
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


MICRONS = ("micron", "um", "µm", "\\u00b5m")  # how TIFF metadata spells micrometres
OME_LENGTH_UM = {**dict.fromkeys(MICRONS, 1.0), "nm": 1e-3, "mm": 1e3}  # OME's length units, in um


def tiff_z_step_um(path: Path) -> float | None:
    """The z step a TIFF records: ImageJ's ``spacing`` or OME's ``PhysicalSizeZ`` (um).

    Parameters
    ----------
    path : Path
        The TIFF file.

    Returns
    -------
    float or None
        The z step (um); None when the file records none in micrometres or its metadata
        cannot be read.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            ij = tf.imagej_metadata or {}
            if "spacing" in ij and str(ij.get("unit", "micron")).lower() in MICRONS:
                return float(ij["spacing"])
            ome = tf.ome_metadata or ""
    except Exception:  # unreadable metadata: the caller asks for --z-step-um
        return None
    return _ome_physical_size_um(ome, "Z")


def _ome_physical_size_um(ome: str, axis: str) -> float | None:
    """OME-XML's ``PhysicalSize<axis>`` in um (its default unit), None when absent or in a unit not of length."""
    import re

    m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', ome)
    unit = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', ome)
    scale = OME_LENGTH_UM.get(unit.group(1) if unit else "um")
    if m and scale is not None:
        return float(m.group(1)) * scale
    return None


def tiff_pixel_size_um(path: Path) -> float | None:
    """The pixel size a TIFF records: OME's ``PhysicalSizeX``, or ImageJ's resolution in microns (um).

    None when the file records none in micrometres (a resolution in inches, the
    default of most writers, says nothing about the specimen) or its metadata cannot be
    read.  FactoryError when the recorded size is outside the schema's limits.
    """
    from factory.inspect_store import check_against_field

    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            ome = tf.ome_metadata or ""
            ij = tf.imagej_metadata or {}
            tag = tf.pages[0].tags.get("XResolution")
            per_unit = tag.value if tag is not None else None
    except Exception:  # unreadable metadata: the caller falls back to the model's pixel size
        return None
    size = _ome_physical_size_um(ome, "X")
    if size is None and str(ij.get("unit", "")).lower() in MICRONS and per_unit and per_unit[0] > 0:
        size = per_unit[1] / per_unit[0]  # ImageJ: pixels per unit, as a fraction
    problem = None if size is None else check_against_field(f"{path}: the pixel size in its metadata is", size,
                                                             *SETTINGS["pixel_size_um"])
    if problem:
        raise FactoryError(problem)
    return size


def read_stacks(path: str | Path) -> np.ndarray:
    """(N, Z, H, W) float32 from a TIFF (one Z x H x W stack, or T x Z x H x W), .npy or a stack store.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    ndarray
        The stacks (N, Z, H, W) as float32; one Z x H x W stack reads as N = 1.

    Raises
    ------
    FactoryError
        A missing, unsupported or unreadable file, no stacks, another number of
        dimensions, stacks smaller than 3 planes of 8 x 8 px, or pixels that are not
        finite real numbers that fit in float32.
    """
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


# --- a recording's file in, its localisations out: `factory predict` ----------------------


@dataclass
class Prediction:
    """What ``predict_file`` found, and with which settings.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per localisation, in pixels from the centre of pixel (0, 0): ``frame,
        t_s, x, y, score`` (+ ``sigma``), and ``x_um, y_um`` (+ ``sigma_um``) when the
        pixel size was given.  3D models: ``frame, x, y, z_um, score, sigma`` (+ ``x_um,
        y_um``), ``z_um`` from the first plane.
    description : str
        What was read, e.g. ``"12 frame(s) of 256 x 256 px"`` (3D models: ``"2 stack(s)
        of 9 planes of 64 x 64 px"``).
    timing : ScanTiming or None
        The scan timing behind ``t_s`` (2D models); ``timing.source`` says where it came from.
    z_step_um : float or None
        The z step (um) of the stacks (3D models).
    """

    table: pd.DataFrame
    description: str
    timing: ScanTiming | None = None
    z_step_um: float | None = None


def predict_file(model: str | Path, recording: str | Path, *, pixel_size_um: float | None = None,
                 dwell_us: float | None = None, line_retrace_ms: float | None = None,
                 frame_flyback_ms: float | None = None, bidirectional: bool | None = None,
                 all_scores: bool = False, z_step_um: float | None = None, target: str | None = None,
                 device: str = "cpu", precision: str = "auto", progress: bool = True, channel: int | None = None,
                 report: Callable[[str], None] | None = None, given_by: str = "the arguments") -> Prediction:
    """Localise the particles of a recording and time-stamp each one (`factory predict`).

    A 2D model reads the recording a chunk of frames at a time, so one of any length
    fits in memory.

    Parameters
    ----------
    model : str or Path
        What ``load_detector`` takes: a run folder, a ``trackpy.json`` or ``"trackpy"``.
    recording : str or Path
        A TIFF (one image or a T x H x W stack), a ``.npy`` file or a store.  3D models
        take z-stacks: a Z x H x W or T x Z x H x W TIFF, ``.npy`` or a stack store.
    pixel_size_um : float, optional
        Pixel size (um): adds ``x_um, y_um`` (and ``sigma_um``).
    dwell_us, line_retrace_ms, frame_flyback_ms : float, optional
        The recording's pixel dwell time (us), line retrace (ms) and the time from a
        frame's last pixel to the next frame's first (ms; default one line retrace).
    bidirectional : bool, optional
        Scan direction.  Scan timing: these values where given, else the store's own
        (a store), else the model's training data, else the seed paper's.
    all_scores : bool
        Keep every candidate, not only those from the detector's tuned ``threshold``.
    z_step_um : float, optional
        3D models: the z step (um) of the stacks; else the store's or the TIFF's
        metadata, else the model's training data.
    target : {"centroid", "exposure"}, optional
        Models with a head per target: which head (default: the centroid).  A model
        without that head is refused.
    device : str
        ``"cpu"`` or ``"cuda"``.
    precision : {"auto", "float32", "int8"}
        A network's inference arithmetic: "auto" runs it in 8-bit integers where it can
        (``models.training.runs.RunFolder.detector``), as the command line does.
    progress : bool
        A progress bar (stderr) counting frames.
    channel : int, optional
        2D models: the channel (from 0) of a TIFF that holds several (``open_recording``).
    report : callable, optional
        Receives the lines saying which scan timing (or z step) was used and why;
        default: this module's logger at INFO.
    given_by : str
        Who gave the timing values, as the reports name them.

    Returns
    -------
    Prediction
        The localisation table and the settings used.  ``t_s`` (seconds from the
        recording's first pixel) is the scan time at the localisation for
        exposure-target models and TrackPy, the frame's mean pixel time for
        centroid-target models.

    Raises
    ------
    FactoryError
        Bad input (file, model, setting), in one line.
    """
    check_settings(pixel_size_um=pixel_size_um, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms,
                   frame_flyback_ms=frame_flyback_ms, z_step_um=z_step_um)
    say = report or log.info
    recording = Path(recording)
    det = load_detector(model, device, prefer=target, precision=precision)
    if target is not None and det.target != target:
        raise FactoryError(f"{model}: --target {target}: the model has no {target} output "
                           f"(it finds the {det.target} target)")
    if det.ndim == 3:
        if channel is not None:
            raise FactoryError(f"--channel {channel}: 3D models take z-stacks of one channel (Z x H x W or T x Z x H x W)")
        return _predict_stacks(det, Path(model), recording, z_step_um, pixel_size_um, all_scores, progress, say)
    with open_recording(recording, channel=channel) as images:
        frame_start = None
        if is_store_path(recording):
            with Store(recording) as st:
                timing = ScanTiming.of_dataset(st.dataset, f"the store {recording}")
                frame_start = st.read("frame_start_s") if "frame_start_s" in st else None
        else:
            timing = (training_timing(Path(model)) if Path(model).is_dir() else None) or ScanTiming()
        timing = timing.with_values(given_by, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms,
                                    frame_flyback_ms=frame_flyback_ms, bidirectional=bidirectional)
        say(f"scan timing: {timing.describe()}")
        table = predict(det, images, pixel_size_um, progress=progress, timing=timing, frame_start_s=frame_start,
                        min_score=None if all_scores else det.threshold)
    return Prediction(table, f"{len(images)} frame(s) of {images.shape[1]} x {images.shape[2]} px", timing)


def _predict_stacks(det: Detector, model: Path, recording: Path, z_step_um: float | None,
                    pixel_size_um: float | None, all_scores: bool, progress: bool,
                    say: Callable[[str], None]) -> Prediction:
    """``predict_file`` with a 3D model: stacks in, (x, y, z_um) out."""
    from factory.inspect_store import check_against_field

    from models.evaluation.truth import with_z_um

    stacks = read_stacks(recording)
    trained = det.z_step_um
    source = "--z-step-um"
    if z_step_um is None and is_store_path(recording):
        with Store(recording) as st:
            stack = st.dataset.stack
        z_step_um, source = (stack.z_step_um if stack else None), f"the store {recording}"
    if z_step_um is None and recording.suffix.lower() in (".tif", ".tiff"):
        z_step_um, source = tiff_z_step_um(recording), f"the TIFF's metadata ({recording})"
    if z_step_um is None and trained:
        z_step_um, source = trained, f"the model's training data ({model})"
    if z_step_um is None:
        raise FactoryError(f"{recording}: the z step is not recorded; give --z-step-um")
    problem = check_against_field(f"{recording}: the z step from {source} is", z_step_um, *SETTINGS["z_step_um"])
    if problem:
        raise FactoryError(problem)
    say(f"z step: {z_step_um:g} um (from {source})")
    if trained and abs(z_step_um - trained) > 1e-6 * trained:
        say(f"note: the model was trained on stacks {trained:g} um apart; its z targets assume that step")
    cut = None if all_scores else det.threshold
    table = with_z_um(det.detect(stacks, progress=progress, min_score=cut), z_step_um)
    if pixel_size_um is not None:
        table["x_um"] = table["x"] * pixel_size_um
        table["y_um"] = table["y"] * pixel_size_um
    if cut is not None:
        table = table[table.score >= cut]
    n, z, h, w = stacks.shape
    return Prediction(table, f"{n} stack(s) of {z} planes of {h} x {w} px", z_step_um=z_step_um)
