"""What a build will take, known before it starts: disk, images, a rough time.

``factory build`` prints one line per dataset and refuses, before writing anything, a
build the free space of ``--out`` cannot hold (a 10^10-image config would otherwise run
for days before failing).  Three numbers per dataset (per shard with ``--shard``):

- uncompressed bytes: exact, from the store layout (``stores.array_specs``);
- at most on disk: the uncompressed bytes plus the codecs' worst-case growth and a
  generous allowance per chunk for the index and file-system blocks, a true upper bound;
- about on disk, and a rough time: from a pilot, the same kernel run on a few movies of
  the dataset (long movies and stacks cut to ``PILOT_FRAMES`` frames) with the store's
  own codec; each array's compression ratio and the kernel's speed on this machine are
  extrapolated.  A pilot that would take too long is skipped: the estimate is then the
  upper bound and the time unknown.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Dataset, FactoryConfig
from .errors import FactoryError
from .rng import dataset_key
from .stores import ArraySpec

# Pilot limits: a few frames (movies and stacks cut to at most PILOT_FRAMES frames),
# about PILOT_WORK particle-pixel-substep evaluations per thread (a second or two) and
# at most PILOT_BYTES of arrays, but always one frame unless that alone is 5x PILOT_WORK.
PILOT_FRAMES = 8
PILOT_ROWS = 256  # enough rows that the codecs see representative data
PILOT_WORK = 2 * 10**7
PILOT_BYTES = 64 * 2**20
# Upper bound: deflate and Blosc grow incompressible data by well under 0.1% (deflate's
# stored blocks: 5 bytes per 64 kB, Blosc: a 16-byte header per block); each chunk gets
# 8 kB for its index entry, header and the file system's partly filled block.
CODEC_GROWTH = 1.001
PER_CHUNK_BYTES = 8192
# The estimate's share per chunk: an HDF5 chunk index entry; a Zarr chunk is a file, which
# fills half a 4 kB file-system block on average plus its inode and directory entry.
CHUNK_OVERHEAD_BYTES = {"hdf5": 64, "zarr": 4096}
FIXED_BYTES = 2**20  # file header, attributes, metadata
PER_ARRAY_BYTES = 8192  # an array's header (HDF5) or metadata file and folder (Zarr)
ESTIMATE_FIXED_BYTES = 64 * 2**10  # the estimate's share: about what a 1-image store takes
# Refuse when the estimate plus this share of it exceeds the free space: the pilot's
# compression ratio is a sample, and a full disk would stop the build near its end.
SPACE_MARGIN = 0.10


@dataclass(frozen=True)
class SizeEstimate:
    """What one dataset (or one shard of it) will take."""

    name: str
    rows: int  # store rows written (images, movie frames or stacks)
    frames: int  # raster frames simulated (a stack's planes counted)
    uncompressed_bytes: int
    bound_bytes: int  # on disk at most
    disk_bytes: int  # on disk, estimated from the pilot (the bound without one)
    seconds: float | None  # rough build time on this machine (None: no pilot)
    threads: int
    pilot: str  # what the estimate rests on, in words


def _row_bytes(s: ArraySpec) -> int:
    return math.prod(s.shape[1:]) * np.dtype(s.dtype).itemsize


def _chunks(s: ArraySpec, rows: int) -> int:
    grid = [-(-rows // s.chunks[0])] + [-(-m // k) for m, k in zip(s.shape[1:], s.chunks[1:])]
    return math.prod(grid)


def upper_bound(specs: list[ArraySpec], rows: int) -> int:
    """Bytes on disk at most for ``rows`` rows of these arrays, whatever the data."""
    raw = sum(_row_bytes(s) * rows for s in specs)
    return (math.ceil(raw * CODEC_GROWTH) + PER_CHUNK_BYTES * sum(_chunks(s, rows) for s in specs)
            + FIXED_BYTES + PER_ARRAY_BYTES * len(specs))


def _compressed_size(a: np.ndarray, fmt: str, compression: str) -> int:
    from .stores import _shuffle_deflate

    if fmt == "hdf5" and compression == "gzip":
        return len(_shuffle_deflate(a))
    from numcodecs import Blosc

    return len(Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE).encode(np.ascontiguousarray(a)))


def _pilot_dataset(ds: Dataset, frames: int) -> Dataset:
    """``ds`` with its movies or stacks cut to at most ``frames`` frames.

    The pilot times frames and samples their compression; a whole long movie would take long.
    """
    if ds.movie is not None and ds.movie.n_frames > frames:
        movie = ds.movie.model_copy(update={"n_frames": frames})
        return ds.model_copy(update={"movie": movie, "n_images": frames, "n_movies": 1})
    if ds.stack is not None and ds.stack.n_planes > frames:
        return ds.model_copy(update={"stack": ds.stack.model_copy(update={"n_planes": frames})})
    return ds


def _pilot(cfg: FactoryConfig, ds: Dataset, fmt: str, streams_in_build: int):
    """Run the pilot; None when too costly.

    Returns (compressed / uncompressed bytes per array, kernel seconds per frame and
    stream, compression seconds per byte, words).
    """
    from numba import get_num_threads

    from .build import specs_for
    from .kernel import allocate_batch, kernel_params, run_batch, schedule_of, store_rows

    h, w = ds.image.height_px, ds.image.width_px
    work_frame = h * w * ds.scan.substeps_per_dwell * (ds.particles.max_particles + 1)
    if work_frame > 5 * PILOT_WORK:
        return None
    pds = _pilot_dataset(ds, max(1, min(PILOT_FRAMES, PILOT_WORK // work_frame)))
    f = pds.frames_per_movie  # frames per stream (a movie, a stack, an image)
    frame_bytes = sum(_row_bytes(s) for s in specs_for(pds, 1)) / max(1, pds.planes)
    threads = get_num_threads()
    want = max(threads, -(-PILOT_ROWS // f))
    # PILOT_WORK per thread: the streams run in parallel, as in the build.
    streams = max(1, min(streams_in_build, want, threads * PILOT_WORK // (f * work_frame),
                         int(PILOT_BYTES // (f * frame_bytes))))
    k, sched = kernel_params(pds), schedule_of(pds)
    key = dataset_key(cfg.seed, ds.name)
    want_e, want_t = pds.output.expected, pds.output.trajectories
    # Compile (or load the cached kernel) on an empty batch: the same types, no work.
    run_batch(k, sched, key, 0, allocate_batch(k, 0, want_e, want_t), want_e, want_t)
    arrays = allocate_batch(k, streams * f, want_e, want_t)
    t0 = time.perf_counter()
    frames = run_batch(k, sched, key, 0, arrays, want_e, want_t)
    kernel_s = time.perf_counter() - t0
    rows = store_rows(pds, frames)
    ratios, raw, t0 = {}, 0, time.perf_counter()
    for s in specs_for(pds, 1):
        a = np.ascontiguousarray(rows[s.name])
        ratios[s.name] = _compressed_size(a, fmt, ds.output.compression) / max(1, a.nbytes)
        raw += a.nbytes
    codec_s_per_byte = (time.perf_counter() - t0) / max(1, raw)
    # Streams ran in parallel on min(threads, streams) threads.
    per_frame_stream = kernel_s * min(threads, streams) / (streams * f)
    cut = "" if pds is ds else (f"movies cut to {f} frames, " if ds.movie is not None else f"stacks cut to {f} planes, ")
    n, used = streams * f, min(threads, streams)
    words = f"pilot of {n} frame{'s' * (n > 1)} ({cut}{used} thread{'s' * (used > 1)})"
    return ratios, per_frame_stream, codec_s_per_byte, words


def estimate(cfg: FactoryConfig, ds: Dataset, fmt: str, start: int = 0, stop: int | None = None,
             pilot: bool = True) -> SizeEstimate:
    """What building rows ``start .. stop`` of ``ds`` (all by default) will take.

    Parameters
    ----------
    cfg, ds
        The validated config and the dataset.
    fmt
        "hdf5" or "zarr" (the codec: ``output.compression`` for HDF5, Blosc-LZ4 for Zarr).
    start, stop
        Store rows to build (a shard's part).
    pilot
        Run the pilot for the estimate on disk and the time (else both are the bound
        and unknown).

    Returns
    -------
    SizeEstimate
        Rows, frames, bytes (uncompressed, at most and about on disk) and seconds.
    """
    from numba import get_num_threads

    from .build import batch_images, specs_for

    stop = ds.n_images if stop is None else stop
    rows = max(0, stop - start)
    specs = specs_for(ds)
    raw = sum(_row_bytes(s) for s in specs) * rows
    bound = upper_bound(specs, rows)
    threads = get_num_threads()
    if rows == 0:
        return SizeEstimate(ds.name, 0, 0, 0, 0, 0, 0.0, threads, "nothing to build")
    streams = rows if ds.movie is None else rows // ds.frames_per_movie
    frames = rows * ds.planes
    result = _pilot(cfg, ds, fmt, streams) if pilot else None
    if result is None:
        why = "no pilot" if not pilot else "no pilot: one frame would take too long"
        return SizeEstimate(ds.name, rows, frames, raw, bound, bound, None, threads, why)
    ratios, per_frame_stream, codec_s_per_byte, words = result
    packed = sum(ratios[s.name] * _row_bytes(s) * rows for s in specs)
    overhead = (CHUNK_OVERHEAD_BYTES[fmt] * sum(_chunks(s, rows) for s in specs)
                + ESTIMATE_FIXED_BYTES + PER_ARRAY_BYTES * len(specs))
    disk = min(bound, math.ceil(packed) + overhead)
    # The kernel runs one stream (movie, stack, image) per thread, over the streams of
    # one batch at a time; compression runs beside it on every core.
    per_batch = batch_images(ds) // (ds.frames_per_movie if ds.movie is not None else 1)
    kernel_s = per_frame_stream * frames / max(1, min(threads, streams, per_batch))
    seconds = kernel_s + codec_s_per_byte * raw / (os.cpu_count() or 1)
    return SizeEstimate(ds.name, rows, frames, raw, bound, disk, seconds, threads, words)


def free_bytes(out: Path) -> tuple[Path, int]:
    """Free bytes where ``out`` is (or will be created): its nearest existing folder."""
    here = Path(out).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return here, shutil.disk_usage(here).free


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units: ``"512 B"``, ``"1.5 MB"``."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def human_seconds(s: float) -> str:
    """A duration of ``s`` seconds in the largest fitting unit: ``"40 s"``, ``"3.5 h"``."""
    if s < 1:
        return "under 1 s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


def _count(e: SizeEstimate) -> str:
    return f"{e.rows:,} images" if e.rows == e.frames else f"{e.rows:,} stacks ({e.frames:,} planes)"


def describe(e: SizeEstimate, part: str = "") -> str:
    """One line: what the dataset (``part``: which shard) will take."""
    what = _count(e)
    disk = (f"about {human_bytes(e.disk_bytes)} on disk (at most {human_bytes(e.bound_bytes)})"
            if e.seconds is not None else f"at most {human_bytes(e.bound_bytes)} on disk")
    when = "time unknown" if e.seconds is None else (
        f"{'about ' if e.seconds >= 1 else ''}{human_seconds(e.seconds)} on {e.threads} threads")
    return (f"estimate: {e.name}{part}: {what}, {human_bytes(e.uncompressed_bytes)} uncompressed, {disk}, "
            f"{when} ({e.pilot})")


def check_space(estimates: list[SizeEstimate], out: Path, source: str) -> str:
    """The summary line of the estimates, after checking that the disk at ``out`` holds them.

    Raises
    ------
    FactoryError
        The free space at ``out`` is less than the estimates plus ``SPACE_MARGIN``; the
        line names the config (``source``), the datasets and the numbers.
    """
    where, free = free_bytes(out)
    need = sum(e.disk_bytes for e in estimates)
    if need * (1 + SPACE_MARGIN) > free:
        big = [e for e in estimates if e.rows]
        what = (f"dataset {big[0].name} ({_count(big[0])})" if len(big) == 1 else
                "datasets " + ", ".join(f"{e.name} ({human_bytes(e.disk_bytes)})" for e in big))
        raise FactoryError(
            f"{source or 'config'}: not enough free disk for {what}: it needs about {human_bytes(need)} "
            f"(+{SPACE_MARGIN:.0%} margin) but {where} has {human_bytes(free)} free; free space, choose "
            f"another --out, or build fewer datasets (--only) or shards (--shard I/N)")
    return f"estimate: about {human_bytes(need)} on disk in all; {where} has {human_bytes(free)} free"
