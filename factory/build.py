"""Build datasets from a validated config into HDF5 or Zarr stores, in one process.

(Sharded builds, for HPC array jobs, are in ``shards``; ``finalize`` assembles and
verifies them.)  Generation streams in batches of whole chunks, so memory stays bounded whatever the
dataset size.  A store (or a shard) is written under a temporary name and renamed only
once complete: an interrupted build never leaves anything that looks done.  Every
finished store records per-shard checksums (one shard for a single-process build), so
``verify`` can prove it whole.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .checksums import Checksums, make_manifest
from .config import Dataset, FactoryConfig, dataset_hash
from .errors import FactoryError
from .kernel import allocate_batch, kernel_params, run_batch, schedule_of, store_rows
from .rng import dataset_key
from .stores import COORDINATES, FORMATS, UNITS, ArraySpec, array_specs, make_writer, remove_path, replace_path

log = logging.getLogger(__name__)

BATCH_BYTES = 64 * 2**20  # simulated data held in memory at once (about)


@dataclass
class BuildResult:
    name: str
    path: Path
    n_images: int
    seconds: float
    bytes_on_disk: int
    skipped: bool = False


def store_path(out: Path, name: str, fmt: str) -> Path:
    return Path(out) / f"{name}{FORMATS[fmt]}"


def store_attrs(cfg: FactoryConfig, ds: Dataset, fmt: str = "hdf5") -> dict:
    """Provenance written into every store's root attributes."""
    fmt_is_hdf5 = fmt == "hdf5"
    return {
        "config": json.dumps({"seed": cfg.seed, "dataset": ds.model_dump(mode="json")}),
        "dataset": ds.name,
        "dataset_hash": dataset_hash(cfg.seed, ds),
        "seed": cfg.seed,
        "package": "twophoton-factory",
        "package_version": __version__,
        "units": json.dumps(UNITS),
        "coordinates": COORDINATES,
        "layout_version": 1,
        "compression": ds.output.compression if fmt_is_hdf5 else "blosc-lz4",
    }


def specs_for(ds: Dataset, n: int | None = None) -> list[ArraySpec]:
    return array_specs(ds.n_images if n is None else n, ds.image.height_px, ds.image.width_px,
                       ds.particles.max_particles, ds.chunk_rows,
                       ds.output.expected, ds.output.trajectories,
                       ds.planes if ds.stack is not None else None)


def batch_images(ds: Dataset) -> int:
    """Images per kernel call: whole chunks (so whole movies), about BATCH_BYTES of arrays."""
    chunk = ds.chunk_rows
    h, w, p = ds.image.height_px, ds.image.width_px, ds.particles.max_particles
    per_image = (h * w * (2 + 4 * ds.output.expected) + p * (61 + 12 * h * w * ds.output.trajectories) + 12)
    per_image *= ds.planes
    return chunk * max(1, BATCH_BYTES // (chunk * per_image))


def disk_usage(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_output_dir(out: Path) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FactoryError(f"{out}: --out exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FactoryError(f"{out}: cannot create the output directory: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise FactoryError(f"{out}: the output directory is not writable")


def simulate_range(cfg: FactoryConfig, ds: Dataset, start: int, stop: int, sink, progress=None) -> None:
    """Simulate images ``start .. stop`` batch by batch, handing each to ``sink(i0, arrays)``.

    Two buffer sets alternate: the kernel (which releases the GIL) fills one while a
    writer thread hands the other to ``sink``, so compression and I/O overlap the
    simulation.  Batches are still written in order, one at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    if stop <= start:
        return
    k, sched = kernel_params(ds), schedule_of(ds)
    key = dataset_key(cfg.seed, ds.name)
    want_e, want_t = ds.output.expected, ds.output.trajectories
    step = batch_images(ds)
    size = min(step, stop - start)
    Z = ds.planes  # kernel frames per store row (a stack's planes)
    buffers = [allocate_batch(k, size * Z, want_e, want_t) for _ in range(2 if stop - start > step else 1)]
    wanted = {"expected": want_e, "trajectories": want_t}
    pending = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as pool:
        for j, i0 in enumerate(range(start, stop, step)):
            n = min(step, stop - i0)
            # Arrays that are not stored stay (1, ...) placeholders the kernel ignores.
            arrays = {name: a[:n * Z] if wanted.get(name, True) else a
                      for name, a in buffers[j % len(buffers)].items()}
            arrays = store_rows(ds, run_batch(k, sched, key, i0 * Z, arrays, want_e, want_t))
            if pending is not None:
                pending.result()  # the other buffer is free again (and errors surface)
                if progress is not None:
                    progress.update(pending_n)
            pending, pending_n = pool.submit(sink, i0, arrays), n
        if pending is not None:
            pending.result()
            if progress is not None:
                progress.update(pending_n)


def write_range(cfg: FactoryConfig, ds: Dataset, writer, start: int, stop: int, offset: int,
                progress=None) -> dict:
    """Simulate [start, stop) into ``writer`` at rows ``i - offset``; return checksums."""
    sums = Checksums([s.name for s in specs_for(ds, 1)])

    def sink(i0, arrays):
        writer.write(i0 - offset, arrays)
        sums.update(arrays)

    simulate_range(cfg, ds, start, stop, sink, progress)
    return sums.hexdigest()


def progress_bar(ds: Dataset, total: int, progress: bool, desc: str | None = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc or ds.name, unit="img", disable=not progress, leave=True)


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}")


def remove_stale(path: Path) -> None:
    """Temporary files left by earlier, killed attempts at ``path``."""
    for p in path.parent.glob(f".{path.name}.partial-*"):
        remove_path(p)


def build_dataset(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str = "hdf5",
                  progress: bool = True) -> BuildResult:
    """Write one dataset to ``<out>/<name>.h5|.zarr`` (replacing an existing one)."""
    final = store_path(out, ds.name, fmt)
    remove_stale(final)
    tmp = tmp_name(final)
    t0 = time.perf_counter()
    bar = progress_bar(ds, ds.n_images, progress)
    try:
        writer = make_writer(fmt, tmp, specs_for(ds), store_attrs(cfg, ds, fmt), ds.output.compression)
        try:
            sums = write_range(cfg, ds, writer, 0, ds.n_images, 0, bar)
            shard = make_manifest(cfg, ds, fmt, 0, 1, 0, ds.n_images, sums)
            writer.set_attrs({"shards": json.dumps([shard]), "complete": True})
        finally:
            writer.close()
        replace_path(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    log.info("built %s: %d images in %.2f s", final, ds.n_images, seconds)
    return BuildResult(ds.name, final, ds.n_images, seconds, disk_usage(final))


# --- entry points -------------------------------------------------------------------------


def select_for_build(cfg: FactoryConfig, out: Path, fmt: str, only: list[str] | None) -> list[Dataset]:
    """The datasets to build, after every check that can run before any work."""
    if fmt not in FORMATS:
        raise FactoryError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    selected = cfg.select(only)
    check_output_dir(Path(out))
    return selected


def build(cfg: FactoryConfig, out: Path, fmt: str = "hdf5", only: list[str] | None = None,
          overwrite: bool = False, progress: bool = True) -> list[BuildResult]:
    """Build the selected datasets of ``cfg`` into ``out`` in this process.

    Every check (dataset names, output folder, existing stores) runs before any work.
    (``factory.shards.build_shards`` builds one shard of each instead.)
    """
    selected = select_for_build(cfg, out, fmt, only)
    out = Path(out)
    if not overwrite:
        existing = [str(store_path(out, d.name, fmt)) for d in selected
                    if store_path(out, d.name, fmt).exists()]
        if existing:
            raise FactoryError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    return [build_dataset(cfg, ds, out, fmt, progress) for ds in selected]
