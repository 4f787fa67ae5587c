"""Chunked HDF5 and Zarr stores: one layout, two formats.

The only module that calls h5py and zarr.

Layout (N images, P = max particles per image, T trajectory samples per frame: H * W
pixel steps with ``output.trajectory_step`` dwell, H lines with line, 1 with frame):

=================  ==============  =======  ==========================================
name               shape           dtype    meaning
=================  ==============  =======  ==========================================
images             (N, H, W)       uint16   recorded photon counts (ADU for a PMT)
expected           (N, H, W)       float32  noise-free expected photons (optional)
n_particles        (N,)            int32    particles in the image
centroids          (N, P, 2)       float32  trajectory centroids (x, y) px, NaN padded
trajectories       (N, P, T, 3)    float32  (x px, y px, z um) per sample (optional)
diffusion          (N, P)          float32  D in um^2/s, NaN padded
n_qd               (N, P)          float32  particle brightness N_qd, NaN padded
exposure_xy        (N, P, 2)       float32  exposure-weighted position (x, y) px
exposure_t_s       (N, P)          float64  its exposure-weighted time, s from the movie start
in_view            (N, P)          uint8    1 where the centroid lies inside the field
frame_start_s      (N,)            float64  start of the frame, s from the movie start
on_fraction        (N, P)          float32  fraction of the frame's pixel steps the
                                            particle was on (blinking stores only)
=================  ==============  =======  ==========================================

A movie store holds its movies' frames one after the other (movie ``i // n_frames``,
frame ``i % n_frames``); particle slot p is the same particle in every frame of a
movie.

A stack store holds one stack per row: ``images`` and ``expected`` are (N, Z, H, W),
``trajectories`` (N, P, Z * T, 3) in time order through the planes, the truth is the
stack's (``centroids`` and ``centroid_z_um``: the mean over all the stack's pixel steps;
``exposure_xy``, ``exposure_z_um``, ``exposure_t_s``: weighted by the particle's own
signal over the whole stack; ``in_view``: the centroid inside the field in x and y), and
``plane_start_s`` and ``plane_z_um`` (N, Z) replace ``frame_start_s``.

Trajectory samples (``output.trajectory_step``): "dwell" stores the position at every
pixel step t (the mean over the dwell's sub-steps, as the image sees it); "line" stores
the same value at the first pixel step of every line in time order (t = 0, W, 2W, ...:
column 0, or column W - 1 on the reversed lines of a bidirectional scan); "frame" at the
first pixel step of every frame (t = 0; of every plane in a stack).  A sample is equal
to the dwell trajectory at its step, bit for bit.

Chunks are sized in bytes: every array has the same rows per chunk, the largest divisor
of the dataset's ``chunk_rows`` (whole movies in a movie store) whose rows of all arrays
together take at most ``CHUNK_BYTES`` (64 MiB), so shards (whole ``chunk_rows``) never
share a chunk and a batch of whole chunks stays bounded.  When one row alone is larger (per-dwell
trajectories of large images), chunks hold one row and an array row larger than
``CHUNK_BYTES`` is cut along its next axes too (e.g. (1, 16, T, 3)).  HDF5 arrays are
compressed with deflate (gzip) after byte shuffling by default: both filters are built
into every HDF5 library (h5py, h5dump, MATLAB, Fiji, HDFView), so any reader opens the
files.  The chunks are compressed in a thread pool and written with
``write_direct_chunk``, which keeps the build close to the speed of Blosc-LZ4; that
remains an option (``output.compression: blosc-lz4``), readable where the Blosc filter
is installed (Python: ``import hdf5plugin`` before h5py).  Zarr stores use Blosc-LZ4.
Root attributes carry the validated config, the package version, the units, the
coordinate convention and the compression.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # registers the Blosc filter with HDF5 (stores built with blosc-lz4)
import numpy as np

try:  # ISA-L's deflate: the same format as zlib's, about 5x faster at level 1
    from isal import isal_zlib as _deflate_lib
except ImportError:  # pragma: no cover - platforms without an isal wheel
    _deflate_lib = None

from .errors import StoreError

UNITS = {
    "images": "photons (ADU for the PMT detector)",
    "expected": "photons",
    "n_particles": "count",
    "centroids": "px (x = column, y = row)",
    "trajectories": "x px, y px, z um; samples at pixel steps 0, s, 2s, ... of every frame (s = 1 dwell, W line, H*W frame: "
                    "output.trajectory_step)",
    "diffusion": "um^2/s",
    "n_qd": "photons (Eq. 1 N_qd)",
    "exposure_xy": "px (x = column, y = row), weighted by the particle's own Eq. 1 signal",
    "exposure_t_s": "s from the movie's first pixel, weighted by the particle's own Eq. 1 signal",
    "in_view": "1 if the trajectory centroid lies inside the field",
    "frame_start_s": "s from the movie's first pixel",
    "centroid_z_um": "um, mean over the stack's pixel steps",
    "exposure_z_um": "um, weighted by the particle's own Eq. 1 signal",
    "plane_start_s": "s from the stack's first pixel",
    "plane_z_um": "um, focal plane of each plane of the stack",
    "on_fraction": "fraction of the frame's (a stack's: the stack's) pixel steps at which the particle was on (blinking)",
}
COORDINATES = (
    "pixels; x = column, y = row; origin at the centre of pixel (0, 0) (TrackPy's convention)"
)
FORMATS = {"hdf5": ".h5", "zarr": ".zarr"}
# Every suffix a store may have, and the format it means.
STORE_SUFFIXES = {".h5": "hdf5", ".hdf5": "hdf5", ".zarr": "zarr"}
COMPRESSIONS = ("gzip", "blosc-lz4")
GZIP_LEVEL = 1
# The oldest file format that holds virtual datasets: HDF5 1.10 readers (h5dump, MATLAB,
# Fiji's HDF5 plugin) open files that "latest" would make unreadable to them.
HDF5_LIBVER = ("earliest", "v110")
# Bytes of one chunk at most (uncompressed), and of one chunk row of all the arrays
# together: a batch of whole chunks then stays about this size (the kernel's batches),
# and so does every read of whole chunks (copy, verify, training).
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store, as it is created.

    Attributes
    ----------
    name : str
        The array's name (a key of ``UNITS``).
    shape : tuple of int
        Its shape, rows first (N, ...).
    dtype : numpy.dtype or type
        Its element type (e.g. ``np.uint16``).
    chunks : tuple of int
        Its chunk shape (``chunk_shape``).
    fill : scalar
        The value of elements never written (NaN, 0 or -1).
    """

    name: str
    shape: tuple[int, ...]
    dtype: Any
    chunks: tuple[int, ...]
    fill: Any


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` (at least 1)."""
    for d in range(max(1, min(n, limit)), 0, -1):
        if n % d == 0:
            return d
    return 1


def chunk_shape(rows: int, row_shape: tuple[int, ...], itemsize: int, budget: int = CHUNK_BYTES) -> tuple[int, ...]:
    """The chunk of an array with ``rows`` rows per chunk, cut to fit ``budget`` bytes.

    When even that exceeds ``budget`` bytes (``rows`` is then 1), it is split along the
    next axes in turn: an axis that must be cut is cut into equal parts (the last one
    possibly shorter) whose chunk fits, axes before it kept at 1.

    Parameters
    ----------
    rows : int
        Rows per chunk.
    row_shape : tuple of int
        The shape of one row.
    itemsize : int
        Bytes per element.
    budget : int
        Bytes of one chunk at most.

    Returns
    -------
    tuple of int
        The chunk shape, ``(rows, *row_shape)`` where that fits.
    """
    chunk = [rows, *row_shape]
    for axis in range(1, len(chunk)):
        if math.prod(chunk) * itemsize <= budget:
            break
        inner = math.prod(chunk[axis + 1:]) * itemsize
        if inner > budget:
            chunk[axis] = 1
            continue
        parts = -(-chunk[axis] // (budget // inner))
        chunk[axis] = -(-chunk[axis] // parts)
        break
    return tuple(chunk)


def array_specs(n: int, height: int, width: int, max_particles: int, chunk: int,
                expected: bool = True, trajectories: bool = True, planes: int | None = None,
                trajectory_samples: int | None = None, movie_frames: int = 1,
                on_fraction: bool = False) -> list[ArraySpec]:
    """The arrays of a store of ``n`` images (or of ``n`` stacks of ``planes``), in write order.

    Parameters
    ----------
    n, height, width, max_particles : int
        Rows, frame size in px and particle slots per row.
    chunk : int
        The dataset's ``chunk_rows``: shards split at its multiples, so every array's rows
        per chunk divide it (no two shards ever write one chunk).
    expected, trajectories : bool
        Whether those optional arrays are stored.
    planes : int, optional
        Planes per row of a stack store (None: images and movie frames).
    trajectory_samples : int, optional
        Trajectory samples per row (``Dataset.trajectory_samples``; default: every pixel
        step of every plane).
    movie_frames : int
        Frames per movie of a movie store (``chunk`` is a multiple of it): batches hold
        whole movies and whole chunks, so chunks hold whole movies, or parts of one
        movie when a movie is larger than ``CHUNK_BYTES``.
    on_fraction : bool
        Whether the particles blink (``on_fraction`` is stored).

    Returns
    -------
    list of ArraySpec
        Every array chunked along N with the same rows per chunk: the largest divisor of
        ``chunk`` (a multiple of ``movie_frames``, or a divisor of it when one movie is
        too large) whose rows of all arrays together take at most ``CHUNK_BYTES`` (so a
        batch of whole chunks stays about that size), capped at ``n``.  When one row
        alone exceeds it, chunks hold one row and an array larger than ``CHUNK_BYTES``
        per row is split along its next axes too (``chunk_shape``).
    """
    P = max_particles
    frame = (height, width) if planes is None else (planes, height, width)
    T = height * width * (planes or 1) if trajectory_samples is None else trajectory_samples
    rows = [("images", frame, np.uint16, 0)]
    if expected:
        rows.append(("expected", frame, np.float32, np.nan))
    rows += [
        ("n_particles", (), np.int32, -1),
        ("centroids", (P, 2), np.float32, np.nan),
    ]
    if planes is not None:
        rows.append(("centroid_z_um", (P,), np.float32, np.nan))
    if trajectories:
        rows.append(("trajectories", (P, T, 3), np.float32, np.nan))
    rows += [
        ("diffusion", (P,), np.float32, np.nan),
        ("n_qd", (P,), np.float32, np.nan),
        ("exposure_xy", (P, 2), np.float32, np.nan),
    ]
    if planes is not None:
        rows.append(("exposure_z_um", (P,), np.float32, np.nan))
    rows += [
        ("exposure_t_s", (P,), np.float64, np.nan),
        ("in_view", (P,), np.uint8, 0),
    ]
    if on_fraction:
        rows.append(("on_fraction", (P,), np.float32, np.nan))
    if planes is None:
        rows.append(("frame_start_s", (), np.float64, np.nan))
    else:
        rows += [("plane_start_s", (planes,), np.float64, np.nan),
                 ("plane_z_um", (planes,), np.float32, np.nan)]
    row_bytes = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype, _ in rows)
    fit, F = CHUNK_BYTES // max(1, row_bytes), movie_frames
    if F <= fit:  # whole movies per chunk
        c = F * _largest_divisor_at_most(chunk // F, fit // F)
    else:  # parts of one movie: lcm(c, F) = F, so a batch is one movie
        c = _largest_divisor_at_most(F, fit)
    c = min(c, n)
    return [ArraySpec(name, (n,) + shape, dtype, chunk_shape(c, shape, np.dtype(dtype).itemsize), fill)
            for name, shape, dtype, fill in rows]


def rows_per_read(specs, budget: int = CHUNK_BYTES) -> int:
    """Rows to read (or copy, or checksum) at once: whole chunks of every array.

    About ``budget`` bytes of all of them (one chunk's rows when those alone exceed it).

    Parameters
    ----------
    specs : iterable
        ArraySpecs or open arrays (anything with ``shape``, ``dtype``, ``chunks``; a
        virtual HDF5 dataset has no chunks and counts as one row).
    budget : int
        Bytes of all the arrays' rows read at once, about.

    Returns
    -------
    int
        A multiple of every array's rows per chunk.
    """
    unit = math.lcm(*(s.chunks[0] if s.chunks else 1 for s in specs))
    row_bytes = sum(math.prod(s.shape[1:]) * np.dtype(s.dtype).itemsize for s in specs)
    return unit * max(1, budget // max(1, unit * row_bytes))


def is_store_path(path: str | Path) -> bool:
    """Whether ``path`` names a store, by its suffix (``.h5``, ``.hdf5`` or ``.zarr``).

    Parameters
    ----------
    path : str or Path
        Any path; it need not exist.

    Returns
    -------
    bool
    """
    return Path(path).suffix.lower() in STORE_SUFFIXES


def store_format(path: str | Path) -> str:
    """'hdf5' or 'zarr' from a store's suffix.

    Parameters
    ----------
    path : str or Path
        The store's path.

    Returns
    -------
    str
        ``"hdf5"`` (``.h5``, ``.hdf5``) or ``"zarr"`` (``.zarr``).

    Raises
    ------
    StoreError
        Any other suffix.
    """
    fmt = STORE_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise StoreError(f"{path}: unknown store type (expected a .h5 or .zarr path)")
    return fmt


def find_stores(path: str | Path) -> list[Path]:
    """A store path itself, or the stores inside a folder (sorted, hidden ones skipped).

    Parameters
    ----------
    path : str or Path
        A store, or a folder of stores.

    Returns
    -------
    list of Path
        The store, or the folder's stores by name.

    Raises
    ------
    StoreError
        No such path, a folder without stores (naming sharded builds not yet finalized),
        or neither a store nor a folder.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such file or directory")
    if is_store_path(path):
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if is_store_path(p) and not p.name.startswith("."))
        if not found:
            pending = sorted(p.name for p in path.glob("*.shards") if p.is_dir())
            hint = (f" (sharded builds not finalized: {', '.join(pending)}; run `factory finalize "
                    "CONFIG --out DIR` once every shard is built)") if pending else ""
            raise StoreError(f"{path}: no .h5 or .zarr stores in this folder{hint}")
        return found
    raise StoreError(f"{path}: not a store (.h5 or .zarr) or a folder of stores")


def find_store(folder: str | Path, name: str) -> Path:
    """The store called ``name`` in ``folder``, whatever its suffix.

    Parameters
    ----------
    folder : str or Path
        The folder to look in.
    name : str
        The store's name without suffix.

    Returns
    -------
    Path
        The first of ``folder/name.h5``, ``.hdf5``, ``.zarr`` that exists.

    Raises
    ------
    StoreError
        No such store.
    """
    for suffix in STORE_SUFFIXES:
        if (Path(folder) / f"{name}{suffix}").exists():
            return Path(folder) / f"{name}{suffix}"
    raise StoreError(f"{folder}: no store named {name} (.h5 or .zarr); build it with `factory build`")


# --- writing -------------------------------------------------------------------------


def _shuffle_deflate(chunk: np.ndarray) -> bytes:
    """One chunk as HDF5's shuffle + deflate filters store it.

    Shuffle puts byte k of every element together (element size s: byte k of element i
    goes to k * n + i); deflate is a zlib stream, which every HDF5 reader decodes
    whichever encoder made it.  ISA-L's level 1 compresses these arrays as well as
    zlib's level 1 at about 5x the speed (measured on the default suite); without it,
    zlib's run-length strategy is the fastest that still compresses.
    """
    raw = np.ascontiguousarray(chunk)
    shuffled = raw.view(np.uint8).reshape(-1, raw.itemsize).T.copy()
    if _deflate_lib is not None:
        return _deflate_lib.compress(shuffled, GZIP_LEVEL)
    z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return z.compress(shuffled) + z.flush()


class HDF5Writer:
    """Writes a new HDF5 store; each array is created chunked and compressed.

    With gzip, whole chunks are compressed in a thread pool (zlib releases the GIL) and
    written with ``write_direct_chunk``; writes that do not cover whole chunks go
    through h5py's own filter pipeline, which produces the same format.

    Parameters
    ----------
    path : Path
        The file to create (an existing one is overwritten).
    specs : list of ArraySpec
        The arrays, each given its ``units`` attribute from ``UNITS``.
    attrs : dict
        Root attributes; ``compression`` is added.
    compression : {"gzip", "blosc-lz4"}
        Shuffle + deflate (level ``GZIP_LEVEL``), or Blosc LZ4 (``hdf5plugin``).

    Raises
    ------
    StoreError
        An unknown compression.
    """

    def __init__(self, path: Path, specs: list[ArraySpec], attrs: dict, compression: str = "gzip"):
        if compression not in COMPRESSIONS:
            raise StoreError(f"{path}: unknown compression {compression!r} (have: {', '.join(COMPRESSIONS)})")
        self.path = Path(path)
        self.compression = compression
        self.file = h5py.File(self.path, "w", libver=HDF5_LIBVER)
        for key, value in {**attrs, "compression": compression}.items():
            self.file.attrs[key] = value
        if compression == "gzip":
            filters = {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
        else:
            filters = dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
        self.specs = {s.name: s for s in specs}
        self.arrays = {}
        for s in specs:
            self.arrays[s.name] = self.file.create_dataset(
                s.name, shape=s.shape, dtype=s.dtype, chunks=s.chunks, fillvalue=s.fill, **filters)
            self.arrays[s.name].attrs["units"] = UNITS[s.name]
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="deflate") \
            if compression == "gzip" else None

    def write(self, start: int, batch: dict) -> None:
        """Write rows ``start .. start + len`` of every array.

        Parameters
        ----------
        start : int
            The first row.
        batch : dict
            Array name -> its rows, for every array of the store, all of one length.
        """
        for name, dset in self.arrays.items():
            data = batch[name]
            c = dset.chunks[0]
            stop = start + len(data)
            if self.pool is None or start % c or (stop % c and stop != dset.shape[0]):
                dset[start:stop] = data
                continue
            # Every chunk of the rows, along N and (for rows larger than a chunk) the
            # other axes too.
            chunks = tuple(dset.chunks)
            grid = [range(0, len(data), c)] + [range(0, m, k) for m, k in zip(data.shape[1:], chunks[1:])]
            pieces, offsets = [], []
            for corner in itertools.product(*grid):
                piece = data[tuple(slice(o, o + k) for o, k in zip(corner, chunks))]
                if piece.shape != chunks:  # an edge chunk is stored at full size
                    pad = np.full(chunks, self.specs[name].fill, piece.dtype)
                    pad[tuple(slice(0, m) for m in piece.shape)] = piece
                    piece = pad
                pieces.append(piece)
                offsets.append((start + corner[0],) + corner[1:])
            for off, blob in zip(offsets, self.pool.map(_shuffle_deflate, pieces)):
                dset.id.write_direct_chunk(off, blob)

    def set_attrs(self, attrs: dict) -> None:
        """Set (or replace) root attributes.

        Parameters
        ----------
        attrs : dict
            Attribute name -> value.
        """
        for key, value in attrs.items():
            self.file.attrs[key] = value

    def close(self) -> None:
        """Finish the compression threads and close the file."""
        if self.pool is not None:
            self.pool.shutdown()
        self.file.close()


def write_virtual_hdf5(path: Path, specs: list[ArraySpec], attrs: dict,
                       sources: list[tuple[str, int, int]]) -> None:
    """An HDF5 file whose arrays are views of other files.

    Parameters
    ----------
    path : Path
        The file to create (an existing one is overwritten).
    specs : list of ArraySpec
        The arrays (shape, dtype and fill value of the views).
    attrs : dict
        Root attributes.
    sources : list of tuple
        ``(relative path, start, stop)`` per source file (relative to the new file's
        folder), each holding rows ``start .. stop`` of every array; empty ranges are
        skipped.  Rows no source covers read as the fill value.
    """
    with h5py.File(path, "w", libver=HDF5_LIBVER) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for s in specs:
            layout = h5py.VirtualLayout(shape=s.shape, dtype=s.dtype)
            for src, a, b in sources:
                if b > a:
                    layout[a:b] = h5py.VirtualSource(src, s.name, shape=(b - a,) + s.shape[1:])
            dset = f.create_virtual_dataset(s.name, layout, fillvalue=s.fill)
            dset.attrs["units"] = UNITS[s.name]


def consolidate_zarr(path: Path, attrs: dict) -> None:
    """Record ``attrs`` in a finished Zarr store and consolidate its metadata.

    Parameters
    ----------
    path : Path
        The Zarr store.
    attrs : dict
        Root attributes to add or replace.
    """
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    g.attrs.update(attrs)
    with warnings.catch_warnings():
        # Consolidated metadata is an extension of Zarr v3 that zarr-python reads.
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def _zarr_compressor():
    from zarr.codecs import BloscCodec

    # The same codec as the HDF5 stores: Blosc LZ4 with byte shuffle.  It compresses at
    # about 1 GB/s, so storage stays a fraction of the kernel's time (zlib/zstd do not).
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


class ZarrWriter:
    """Writes (or, for shards, opens) a Zarr v3 group with one array per field.

    Arrays are compressed with Blosc LZ4 and byte shuffle, as the HDF5 option.

    Parameters
    ----------
    path : Path
        The store's folder.
    specs : list of ArraySpec
        The arrays, each given its ``units`` attribute from ``UNITS``.
    attrs : dict
        Root attributes (``compression`` is added); unused when opening.
    create : bool
        Create the group (an existing one is overwritten), or open an existing one to
        write rows into.
    """

    def __init__(self, path: Path, specs: list[ArraySpec], attrs: dict, create: bool = True):
        import zarr

        self.path = Path(path)
        if create:
            self.group = zarr.open_group(str(self.path), mode="w", zarr_format=3)
            self.group.attrs.update({**attrs, "compression": "blosc-lz4"})
            self.arrays = {}
            for s in specs:
                arr = self.group.create_array(
                    s.name, shape=s.shape, dtype=s.dtype, chunks=s.chunks,
                    fill_value=s.fill, compressors=_zarr_compressor(),
                    attributes={"units": UNITS[s.name]},
                )
                self.arrays[s.name] = arr
        else:
            self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
            self.arrays = {s.name: self.group[s.name] for s in specs}

    def write(self, start: int, batch: dict) -> None:
        """Write rows ``start .. start + len`` of every array.

        Parameters
        ----------
        start : int
            The first row.
        batch : dict
            Array name -> its rows, for every array of the store, all of one length.
        """
        for name, arr in self.arrays.items():
            data = batch[name]
            arr[start:start + len(data)] = data

    def set_attrs(self, attrs: dict) -> None:
        """Set (or replace) root attributes.

        Parameters
        ----------
        attrs : dict
            Attribute name -> value.
        """
        self.group.attrs.update(attrs)

    def close(self) -> None:
        """Nothing to release: every write is already stored."""
        pass


def make_writer(fmt: str, path: Path, specs: list[ArraySpec], attrs: dict, compression: str = "gzip"):
    """The writer of a new store of format ``fmt``.

    Parameters
    ----------
    fmt : {"hdf5", "zarr"}
        The store's format.
    path : Path
        The file (HDF5) or folder (Zarr) to create.
    specs : list of ArraySpec
        The arrays.
    attrs : dict
        Root attributes.
    compression : {"gzip", "blosc-lz4"}
        HDF5 only: Zarr stores are always Blosc LZ4.

    Returns
    -------
    HDF5Writer or ZarrWriter
        A ``HDF5Writer`` for ``"hdf5"``, else a ``ZarrWriter``.
    """
    if fmt == "hdf5":
        return HDF5Writer(path, specs, attrs, compression)
    return ZarrWriter(path, specs, attrs)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree if it exists.

    A symbolic link is removed, not followed.

    Parameters
    ----------
    path : Path
        What to delete.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(src: Path, dst: Path) -> None:
    """Move a finished store into place; an existing destination is replaced.

    Parameters
    ----------
    src : Path
        The finished store (file or folder), on the file system of ``dst``.
    dst : Path
        Its final path.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        # A directory cannot be os.replace'd over a non-empty one: move it aside first
        # so the old store disappears only once the new one is in place.
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, trash)
        os.replace(src, dst)
        remove_path(trash)
    else:
        os.replace(src, dst)


# --- reading -------------------------------------------------------------------------


class Store:
    """Read access to a finished HDF5 or Zarr store, the same API for both.

    ``store["images"][a:b]`` returns a NumPy array; ``store.attrs`` the root attributes.
    A store is served only when complete (``complete=False`` is for the code that
    checks or assembles unfinished ones): its completeness mark, written after every
    array, and for a virtual HDF5 store every shard file it reads from.

    Parameters
    ----------
    path : str or Path
        A ``.h5``, ``.hdf5`` or ``.zarr`` store.
    complete : bool
        Refuse a store that is not complete (``unfinished``).

    Attributes
    ----------
    path : Path
        The store's path.
    format : {"hdf5", "zarr"}
        Its format.
    attrs : dict
        Its root attributes.

    Raises
    ------
    StoreError
        An unknown suffix, no such store, a file that cannot be opened as a store, no
        ``images`` array, or (with ``complete``) a store that is not complete.
    """

    def __init__(self, path: str | Path, complete: bool = True):
        self.path = Path(path)
        self.format = store_format(self.path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such store")
        try:
            if self.format == "hdf5":
                self._h5 = h5py.File(self.path, "r")
                self._group = self._h5
                self.attrs = {k: _decode(v) for k, v in self._h5.attrs.items()}
            else:
                import zarr

                self._h5 = None
                self._group = zarr.open_group(str(self.path), mode="r")
                self.attrs = dict(self._group.attrs)
            names = self.names
        except Exception as exc:  # a damaged file fails in h5py's C code or zarr's JSON, any way
            first = (str(exc).splitlines() or [""])[0]
            raise StoreError(f"{self.path}: cannot open as {self.format}, the store is damaged or "
                             f"not a store ({type(exc).__name__}: {first})") from None
        if "images" not in names:
            self.close()
            raise StoreError(f"{self.path}: not a dataset store (no 'images' array)")
        if complete:
            why = self.unfinished()
            if why:
                self.close()
                raise StoreError(f"{self.path}: {why}")

    def unfinished(self) -> str | None:
        """Why this store must not be read as a dataset (None when it is complete).

        Returns
        -------
        str or None
            A shard of a sharded build, no completeness mark (an unfinished build), or
            missing shard files of a virtual HDF5 store, with what to do about it.
        """
        if "shard" in self.attrs:
            return (f"shard {self.attrs['shard']} of {self.attrs.get('shards')} of a sharded build, "
                    "not a store; run `factory finalize CONFIG --out DIR` and read the finalized store")
        if self.attrs.get("complete") is not True:
            if self.path.parent.name.endswith(".shards"):
                return ("an unfinished sharded build; run `factory finalize CONFIG --out DIR --format "
                        f"{self.format}` once every shard is built")
            return ("unfinished (its build did not complete); rebuild it with "
                    "`factory build CONFIG --out DIR --overwrite`")
        missing = self.missing_sources()
        if missing:
            return (f"its shard files are missing ({', '.join(missing[:3])}"
                    f"{', ...' if len(missing) > 3 else ''}); keep the .shards folder beside the store, "
                    "or finalize with --copy for one self-contained file")
        return None

    @property
    def names(self) -> list[str]:
        """The names of the store's arrays, sorted."""
        return sorted(self._group.keys())

    def __getitem__(self, name: str):
        try:
            return self._group[name]
        except KeyError:
            raise StoreError(f"{self.path}: no array '{name}' (have: {', '.join(self.names)})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return int(self._group["images"].shape[0])

    @property
    def config(self) -> dict:
        """The validated config the store was built from (its ``config`` attribute), as a dict."""
        return json.loads(self.attrs["config"])

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start .. stop`` of array ``name``; a corrupt chunk is a StoreError.

        Parameters
        ----------
        name : str
            The array.
        start : int
            The first row.
        stop : int, optional
            The row after the last (default: the end).

        Returns
        -------
        ndarray
            The rows, in the array's dtype.

        Raises
        ------
        StoreError
            No such array, or rows that cannot be read (a damaged store).
        """
        arr = self[name]
        try:
            return np.asarray(arr[start:stop])
        except Exception as exc:  # h5py raises OSError, zarr's codecs anything: a damaged file
            first = (str(exc).splitlines() or [""])[0]
            raise StoreError(f"{self.path}: array '{name}' rows {start}..{'end' if stop is None else stop - 1} "
                             f"unreadable, the store is damaged ({type(exc).__name__}: {first}); "
                             "rebuild it or check it with `factory verify`") from None

    @functools.cached_property
    def dataset(self):
        """The store's validated dataset config (``factory.config.Dataset``)."""
        from .config import config_from_json

        cfg = self.config
        name = cfg["dataset"]["name"]
        return config_from_json(json.dumps({"seed": cfg["seed"], "datasets": {name: cfg["dataset"]}})).datasets[name]

    @property
    def kind(self) -> str:
        """What the store holds: ``"images"``, ``"movies"`` or ``"stacks"``.

        ``"movies"``: the frames of its movies, one after another; ``"stacks"``: z-stacks,
        one per row.
        """
        ds = self.dataset
        return "stacks" if ds.stack is not None else "movies" if ds.movie is not None else "images"

    @property
    def chunk_rows(self) -> int:
        """Rows (images, frames or stacks) per chunk of ``images``.

        For a virtual (finalized sharded) HDF5 store, which has no chunks of its own, the
        dataset's chunk rows (whole chunks of its shard files).
        """
        chunks = self["images"].chunks
        return int(chunks[0]) if chunks else self.dataset.chunk_rows

    def missing_sources(self) -> list[str]:
        """Source files of a virtual HDF5 store that are not there.

        A virtual dataset silently reads fill values for them.

        Returns
        -------
        list of str
            The missing files as the store names them (relative to its folder), sorted;
            empty for other stores.
        """
        if self.format != "hdf5" or not self["images"].is_virtual:
            return []
        return sorted({vs.file_name for n in self.names for vs in self[n].virtual_sources()
                       if not (self.path.parent / vs.file_name).exists()})

    def close(self) -> None:
        """Close the HDF5 file (a Zarr store holds none open)."""
        if self._h5 is not None:
            self._h5.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
