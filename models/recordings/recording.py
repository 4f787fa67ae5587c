"""A user's recording (T x H x W frames), read a chunk of frames at a time.

Real recordings run to thousands of 512 x 512 frames: a gigabyte of uint16, twice that
as float32.  A ``Recording`` never holds them whole.  An uncompressed TIFF whose frames
lie one after the other in the file (and a .npy file) is memory-mapped one chunk at a
time, and the map is dropped before the next, so the pages it touched leave the process
too; any other TIFF is decoded page by page; a store is read a few of its own chunks at
a time.  Each chunk becomes float32 only when it is used: memory holds one chunk
(``CHUNK_BYTES`` of float32), whatever the length of the recording.

Everything that can be checked before the work is checked when the recording is opened,
from the shape and pixel type alone: frames of different sizes, no frames, frames too
small, a colour image.  Float pixels are scanned for NaN, infinite and too large values
in one streamed pass at opening too, so a bad pixel in the last frame is refused before
any frame is localised, with the same message as for a recording read whole.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from factory.errors import FactoryError
from factory.stores import Store, is_store_path

CHUNK_BYTES = 32 * 2**20  # float32 frames per chunk, in bytes (32 frames of 512 x 512 px)


class Recording:
    """A recording's frames, read a chunk at a time (``open_recording``, ``as_recording``).

    Parameters
    ----------
    path : Path
        Where the frames come from (messages name it).
    shape : tuple of int
        ``(n, height, width)``: frames and their size (px).
    dtype : numpy.dtype
        The pixel type as stored.
    read : callable
        ``read(a, b)`` returns frames ``a .. b - 1`` in their own type.
    close : callable, optional
        Releases the file (``close``, or leaving ``with``).
    align : int
        Frames best read together (a store's chunk rows).
    kind : {"memmap", "pages", "store", "array"}
        How the frames are read (``"array"``: held whole).
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: np.dtype,
                 read: Callable[[int, int], np.ndarray], close: Callable[[], None] | None = None,
                 align: int = 1, kind: str = "array"):
        self.path = Path(path)
        self.kind = kind
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._read = read
        self._close = close
        self.align = max(1, int(align))

    def __len__(self) -> int:
        return self.shape[0]

    def frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start .. stop - 1`` as float32 (N, H, W), a new array."""
        stop = len(self) if stop is None else min(stop, len(self))
        return np.asarray(self._read(start, stop)).reshape(-1, *self.shape[1:]).astype(np.float32)

    def read(self) -> np.ndarray:
        """Every frame as float32 (N, H, W): the whole recording in memory."""
        return self.frames(0, len(self))

    def chunk_frames(self, step: int = 1) -> int:
        """Frames per chunk: about ``CHUNK_BYTES`` of float32, a multiple of ``step``.

        Also a multiple of ``align`` unless that would make chunks much larger.
        """
        step = max(1, int(step))
        unit = step * self.align // math.gcd(step, self.align)
        frame_bytes = 4 * self.shape[1] * self.shape[2]
        if unit * frame_bytes > 4 * CHUNK_BYTES:
            unit = step
        return max(unit, CHUNK_BYTES // frame_bytes // unit * unit)

    def chunks(self, step: int = 1, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first frame, float32 frames)`` for frames ``start .. stop - 1``, chunk by chunk.

        Each chunk is a multiple of ``step`` frames (but the last).
        """
        stop = len(self) if stop is None else min(stop, len(self))
        size = self.chunk_frames(step)
        for a in range(start, stop, size):
            yield a, self.frames(a, min(a + size, stop))

    def mean_frame(self, stop: int | None = None) -> np.ndarray:
        """The mean of frames ``0 .. stop - 1`` (float64, H x W), streamed."""
        total, n = np.zeros(self.shape[1:], np.float64), 0
        for _, chunk in self.chunks(stop=stop):
            total += chunk.sum(0, dtype=np.float64)
            n += len(chunk)
        return total / max(n, 1)

    def check_pixels(self) -> None:
        """Refuse, with FactoryError, pixels that are not finite real numbers that fit in float32.

        A pixel type that is not a real number, and float pixels that are NaN, infinite
        or too large for float32 (one streamed pass over the frames).
        """
        if not _is_float(self.dtype, self.path):
            return
        nan = inf = 0
        big = 0.0
        for _, raw in self._raw_chunks():
            nan += int(np.isnan(raw).sum())
            inf += int(np.isinf(raw).sum())
            if not (nan or inf) and raw.size:  # the size matters only where all is finite
                big = max(big, float(np.abs(raw).max()))
        _refuse_pixels(self.path, nan, inf, big)

    def _raw_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        size = self.chunk_frames()
        for a in range(0, len(self), size):
            yield a, np.asarray(self._read(a, min(a + size, len(self))))

    def close(self) -> None:
        """Release the file; a second call does nothing."""
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_recording(images, path: str | Path = "<array>") -> Recording:
    """An in-memory (N, H, W) or (H, W) array behind the ``Recording`` interface.

    Raises ValueError for another number of dimensions.
    """
    a = np.asarray(images)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (H, W), got shape {a.shape}")
    return Recording(Path(path), a.shape, a.dtype, lambda i, j: a[i:j])


def open_recording(path: str | Path, scan_values: bool = True, channel: int | None = None) -> Recording:
    """Open a recording, checked and ready to be read chunk by chunk; close it (or use ``with``).

    Parameters
    ----------
    path : str or Path
        A TIFF (one image or a T x H x W stack, or a T x C x H x W movie of several
        channels), a ``.npy`` file or a store (``.h5``, ``.zarr``).
    scan_values : bool
        Scan float pixels for NaN, infinite and too large values (one streamed pass);
        False skips it.
    channel : int, optional
        The channel to read (from 0) of a TIFF whose axes (ImageJ hyperstack, OME or
        tifffile metadata) hold several; required for such a file, and only 0 (or None)
        for a file of one channel.

    Returns
    -------
    Recording
        (T, H, W) frames; one image reads as T = 1.

    Raises
    ------
    FactoryError
        A missing, unsupported or unreadable file; no frames, frames of different sizes
        or smaller than 8 x 8 px, a colour image or another shape; several channels and
        no ``channel``, or a ``channel`` the file does not hold; with ``scan_values``,
        pixels that are not finite real numbers that fit in float32.
    """
    path = Path(path)
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
        raise FactoryError(f"--channel {channel}: give a channel number from 0")
    rec = _open(path, channel)
    try:
        _check_shape(rec.shape, path)
        rec.shape = rec.shape if len(rec.shape) == 3 else (1, *rec.shape)
        if scan_values:
            rec.check_pixels()
    except BaseException:
        rec.close()
        raise
    return rec


# --- opening each kind of file -----------------------------------------------------------


def _open(path: Path, channel: int | None = None) -> Recording:
    """The recording at ``path`` (its ``channel``) in whatever shape it has (checked by the caller)."""
    if not path.exists():
        raise FactoryError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".tif", ".tiff", ".npy") and not is_store_path(path):
        raise FactoryError(f"{path}: unsupported input (use .tif/.tiff, .npy, .h5 or .zarr)")
    try:
        if suffix in (".tif", ".tiff"):
            return _open_tiff(path, channel)
        _one_channel(path, channel)
        if suffix == ".npy":
            return _open_npy(path)
        st = Store(path)
        try:
            arr = st["images"]
            return Recording(path, arr.shape, arr.dtype, lambda a, b: st.read("images", a, b), st.close,
                             align=st.chunk_rows, kind="store")
        except BaseException:
            st.close()
            raise
    except FactoryError:
        raise
    except Exception as exc:  # a corrupt file can raise anything from the reader
        raise FactoryError(_cannot_read(path, exc)) from None


def _cannot_read(path: Path, exc: Exception) -> str:
    return f"{path}: cannot read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _reading(path: Path, read: Callable[[int, int], np.ndarray]) -> Callable[[int, int], np.ndarray]:
    """``read`` with a file that turns out corrupt half-way refused in one line."""

    def guarded(a: int, b: int) -> np.ndarray:
        try:
            return read(a, b)
        except FactoryError:
            raise
        except Exception as exc:
            raise FactoryError(_cannot_read(path, exc)) from None

    return guarded


def _mapped(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], first: int = 0,
            stride: int = 1) -> Callable[[int, int], np.ndarray]:
    """A reader of frames ``a .. b - 1`` of ``shape`` (N, H, W) C-ordered in ``path``.

    Frame t is image ``first + t * stride`` of those stored one after the other from
    ``offset`` (a stride of C: one channel of a movie whose frames interleave C
    channels).  Each read is a memory map of just those images, unmapped (its pages
    leaving the process) once the caller has converted it and let it go.
    """
    frame = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def read(a: int, b: int) -> np.ndarray:
        if b <= a or frame == 0:
            return np.zeros((0, *shape[1:]), dtype)
        images = np.memmap(path, dtype, "r", offset + (first + a * stride) * frame, ((b - a - 1) * stride + 1, *shape[1:]))
        return images[::stride]

    return read


def open_tiff(path: Path):
    """``tifffile.TiffFile(path)``, every page located; a damaged file or pages of two sizes refused.

    A truncated or corrupt TIFF does not make tifffile raise: it logs the bad page offset
    (to stderr) and goes on with the pages before it, and a movie whose metadata asks for
    more pages than it has is then read as one image.  Here tifffile's log records are
    kept from stderr while the pages are located, and a warning or an error among them,
    no page at all, or a page whose pixels run past the end of the file refuses the file
    in one line, before any frame is read.
    """
    import logging

    import tifffile

    said: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record)

    log, keep = logging.getLogger("tifffile"), _Keep(logging.WARNING)
    log.addHandler(keep)
    propagate, log.propagate = log.propagate, False
    tf = None
    try:
        tf = tifffile.TiffFile(path)
        n = len(tf.pages)  # locates every page: a bad offset is logged here
        series = tf.series  # and a shape the pages cannot fill, here
        if said or not n or not series:
            why = said[0].getMessage().split("> ", 1)[-1] if said else "no image in it"
            raise FactoryError(f"{path}: a damaged TIFF ({why}); was it written or copied completely?")
        size, shapes = path.stat().st_size, set()
        for i, page in enumerate(tf.pages):
            shapes.add(tuple(page.shape))
            # Pixels that run past the end of the file: cut in the last frames' data.  (A
            # page without pixels, as tifffile writes an empty movie, is refused later as such.)
            end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
            if end > size and math.prod(page.shape):
                raise FactoryError(f"{path}: a damaged TIFF (frame {i + 1} of {n} ends at byte {end} of a file of "
                                   f"{size}); was it written or copied completely?")
        if len(shapes) > 1:
            raise FactoryError(f"{path}: frames of different sizes ({', '.join('x'.join(map(str, sh)) for sh in sorted(shapes))}); "
                               "a recording's frames must all have one size")
        return tf
    except BaseException:
        if tf is not None:
            tf.close()
        raise
    finally:
        log.removeHandler(keep)
        log.propagate = propagate


def _open_tiff(path: Path, channel: int | None = None) -> Recording:
    tf = open_tiff(path)
    try:
        if pages_are_frames(tf, path):
            _one_channel(path, channel)
            shape, dtype = tuple(tf.series[0].shape), tf.series[0].dtype

            def read_pages(a: int, b: int) -> np.ndarray:
                return tf.asarray(key=range(a, b)) if b > a else np.zeros((0, *shape), dtype)

            return Recording(path, (len(tf.pages), *shape), dtype, _reading(path, read_pages), tf.close, kind="pages")
        series = tf.series[0]
        dtype = series.dtype
        if "C" in series.axes:
            # Frame t of the channel is image first + t * stride of the series, in file order.
            shape, first, stride, images = _channel_layout(series, path, channel)
        else:
            _one_channel(path, channel)
            if len(series.shape) == 3 and series.axes[:1] == "S":
                # Samples of one pixel (planar RGB), not frames in time.
                raise FactoryError(f"{path}: its {series.shape[0]} images are the colour samples of one image "
                                   f"(axes {series.axes}); give single-channel frames (H x W or T x H x W)")
            shape, first, stride = tuple(series.shape), 0, 1
            images = shape[0] if len(shape) == 3 else 1
        n = shape[0] if len(shape) == 3 else 1
        if dtype is not None and len(shape) in (2, 3) and series.dataoffset is not None and tf.filehandle.is_file:
            # Uncompressed frames one after the other: memory-mapped, as tifffile.memmap does.
            dtype = np.dtype(tf.byteorder + dtype.char)
            read = _mapped(path, series.dataoffset, dtype, (n, *shape[-2:]), first, stride)
            tf.close()
            return Recording(path, shape, dtype, _reading(path, read), kind="memmap")
        if dtype is not None and len(shape) == 3 and len(series.pages) == images:
            def read(a: int, b: int) -> np.ndarray:
                pages = range(first + a * stride, first + b * stride, stride)
                return tf.asarray(key=pages, series=0) if b > a else np.zeros((0, *shape[1:]), dtype)

            return Recording(path, shape, dtype, _reading(path, read), tf.close, kind="pages")
        if "C" in series.axes:
            raise FactoryError(f"{path}: {len(series.pages)} pages for {images} images of its channels; "
                               "give one page per frame and channel")
        # Anything else: one compressed image, read whole as it is small; or a shape to be
        # refused, refused before a read (a hyperstack can be gigabytes).
        _check_shape(shape, path)
        a = np.asarray(tf.asarray())
        tf.close()
        return Recording(path, a.shape, a.dtype, lambda i, j: a[i:j] if a.ndim == 3 else a[None])
    except BaseException:
        tf.close()
        raise


def tiff_channels(path: str | Path) -> int:
    """The channels a recording holds: a TIFF's C axis, else 1 (any other file; one unreadable here)."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return 1
    try:
        with open_tiff(path) as tf:
            series = tf.series[0]
            return int(series.shape[series.axes.index("C")]) if "C" in series.axes and len(tf.series) == 1 else 1
    except Exception:  # refused, in its own words, when it is opened
        return 1


def _one_channel(path: Path, channel: int | None) -> None:
    """Refuse a channel other than 0 of a file of one channel."""
    if channel:
        raise FactoryError(f"{path}: --channel {channel}: it holds one channel (give 0, or leave --channel out)")


def _channel_layout(series, path: Path, channel: int | None) -> tuple[tuple[int, int, int], int, int, int]:
    """Where one channel's frames lie in a TIFF series whose axes hold several channels.

    T x C x Y x X (frames interleave the channels, as ImageJ and most microscopes write
    them), C x T x Y x X (each channel's frames together) or C x Y x X (one frame).
    Returns the channel's (frames, height, width), the series image of its first frame,
    the stride between its frames, and the series' images in all.
    """
    axes, shape = series.axes, tuple(series.shape)
    n_c = shape[axes.index("C")]
    time_axes = [a for a in axes if a not in "CYX"]
    if not axes.endswith("YX") or len(time_axes) > 1:
        raise FactoryError(f"{path}: axes {axes} (shape {' x '.join(map(str, shape))}): give a movie of one or more "
                           "channels (T x H x W, or T x C x H x W)")
    if channel is None:
        raise FactoryError(f"{path}: holds {n_c} channels (axes {axes}); choose one with --channel (0 to {n_c - 1})")
    if channel >= n_c:
        raise FactoryError(f"{path}: --channel {channel}: it holds channels 0 to {n_c - 1} (axes {axes})")
    n = shape[axes.index(time_axes[0])] if time_axes else 1
    interleaved = bool(time_axes) and axes.index(time_axes[0]) < axes.index("C")
    first, stride = (channel, n_c) if interleaved else (channel * n, 1)
    return (n, *shape[-2:]), first, stride, n * n_c


def _open_npy(path: Path) -> Recording:
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # Python objects in it: refused by np.load, in its own words
        a = np.load(path, allow_pickle=False)
        return Recording(path, a.shape, a.dtype, lambda i, j: a[i:j] if a.ndim == 3 else a[None])
    shape, dtype, offset = mm.shape, mm.dtype, mm.offset
    if mm.ndim > 1 and not mm.flags.c_contiguous:  # Fortran order: frames are not contiguous
        fortran = mm
        return Recording(path, shape, dtype, lambda i, j: fortran[i:j] if fortran.ndim == 3 else fortran[None])
    del mm
    n = shape[0] if len(shape) == 3 else 1
    return Recording(path, shape, dtype, _reading(path, _mapped(path, offset, dtype, (n, *shape[-2:]))),
                     kind="memmap")


# --- checks -----------------------------------------------------------------------------

# A physical setting of a recording takes the limits of the config field it stands for
# (`factory schema`): setting -> (field, what it is, unit).
SETTINGS = {
    "pixel_size_um": ("image.pixel_size_um", "a pixel size", "um"),
    "dwell_us": ("scan.dwell_us", "a dwell time", "us"),
    "line_retrace_ms": ("scan.line_retrace_ms", "a time", "ms"),
    "frame_flyback_ms": ("movie.frame_flyback_ms", "a time", "ms"),
    "z_step_um": ("stack.z_step_um", "a z step", "um"),
}


def check_settings(**settings: float | None) -> None:
    """Refuse, in one line, a setting that is not finite or outside its config field's limits.

    The limits are those of the field in ``SETTINGS``; a setting without a config field
    (``max_diffusion_um2_s``, ``search_range_um``) must be finite and > 0.  None: not
    given.  The FactoryError's line names the setting as its command-line flag
    (``dwell_us``: ``--dwell-us``).
    """
    from factory.inspect_store import check_against_field

    for key, value in settings.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key in SETTINGS:
            problem = check_against_field(flag, value, *SETTINGS[key])
        else:
            problem = None if math.isfinite(value) and value > 0 else f"{flag} {value}: must be a finite number > 0"
        if problem:
            raise FactoryError(problem)



def pages_are_frames(tf, path: Path) -> bool:
    """Whether a TIFF's pages are its frames, one image series each.

    As written a frame at a time (each write its own series, as ``tifffile.TiffWriter``
    does); ``tf`` is an open ``tifffile.TiffFile``.  False for one series.  Series of
    several images each (positions, or movies of an OME file) are refused: which of them
    is the movie is for the user to say.
    """
    shapes = [tuple(s.shape) for s in tf.series]
    if len(shapes) < 2:
        return False
    if any(len(sh) != 2 for sh in shapes):
        listed = ", ".join("x".join(map(str, sh)) for sh in shapes[:4]) + (", ..." if len(shapes) > 4 else "")
        raise FactoryError(f"{path}: holds {len(shapes)} image series ({listed}); give one movie (T x H x W) per file")
    return True


def check_frames(shape: tuple[int, ...], path: Path, what: str) -> None:
    """Refuse an array of ``shape`` with no frames (or stacks: ``what``) in it."""
    if math.prod(shape) == 0:
        if len(shape) and shape[0] == 0:
            raise FactoryError(f"{path}: holds no {what} (array of shape {shape})")
        raise FactoryError(f"{path}: {what} without pixels (array of shape {shape})")


def _check_shape(shape: tuple[int, ...], path: Path) -> None:
    """Refuse, from its shape alone, what is not one image (H x W) or a stack (T x H x W).

    Frames must be at least 8 x 8 px.
    """
    check_frames(shape, path, "images")
    if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) >= 8:
        # H x W x 3 (or 4) is a colour image; as T x H x W it would be frames 3 px wide.
        raise FactoryError(f"{path}: shape {shape} looks like a colour image ({shape[0]} x {shape[1]} px, "
                           f"{shape[2]} channels) or frames only {shape[2]} px wide; give single-channel "
                           "frames of at least 8 x 8 px (H x W or T x H x W)")
    if len(shape) not in (2, 3):
        raise FactoryError(f"{path}: expected one image (H x W) or a stack (T x H x W), got shape {shape}")
    if min(shape[-2:]) < 8:
        raise FactoryError(f"{path}: images of {shape[-2]} x {shape[-1]} px are too small (at least 8 x 8)")


def _is_float(dtype: np.dtype, path: Path) -> bool:
    """Whether pixels of ``dtype`` are floats (to be checked for NaN and size).

    A type that is not a real number is refused.
    """
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise FactoryError(f"{path}: pixel type {dtype} is not a real number type")
    return bool(np.issubdtype(dtype, np.floating))


def _refuse_pixels(path: Path, nan: int, inf: int, big: float) -> None:
    if nan or inf:
        what = " and ".join(f"{k} {name}" for k, name in ((nan, "NaN"), (inf, "infinite")) if k)
        raise FactoryError(f"{path}: {what} pixel value(s); every pixel must be a finite number")
    limit = float(np.finfo(np.float32).max)
    if big > limit:
        raise FactoryError(f"{path}: pixel values up to {big:.3g} do not fit in 32-bit floats (at most "
                           f"{limit:.3g}); rescale the recording")


def check_pixels(a: np.ndarray, path: Path) -> None:
    """``Recording.check_pixels`` for an array held whole."""
    if _is_float(a.dtype, path):
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        _refuse_pixels(path, nan, inf, 0.0 if nan or inf or not a.size else float(np.abs(a).max()))
