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
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .checksums import Checksums, make_manifest
from .config import Dataset, FactoryConfig, dataset_hash
from .errors import FactoryError
from .kernel import allocate_batch, kernel_params, run_batch, schedule_of, store_rows
from .rng import dataset_key
from .publish import publish, store_locks, tmp_name
from .stores import COORDINATES, FORMATS, UNITS, ArraySpec, array_specs, make_writer, remove_path

log = logging.getLogger(__name__)

BATCH_BYTES = 64 * 2**20  # simulated data held in memory at once (about)


@dataclass
class BuildResult:
    """What building one dataset (or one shard of it) did.

    Attributes
    ----------
    name : str
        The dataset.
    path : Path
        The store written (a shard: its manifest).
    n_images : int
        Store rows built (a shard: its rows).
    seconds : float
        Wall time of the build (0 when skipped).
    bytes_on_disk : int
        Size of the store (0 for a shard).
    skipped : bool
        A shard found complete and valid, left as it was.
    shard : tuple of int or None
        ``(I, N)`` for shard I of N (``build_shards``); None for a whole store.
    """

    name: str
    path: Path
    n_images: int
    seconds: float
    bytes_on_disk: int
    skipped: bool = False
    shard: tuple[int, int] | None = None

    def summary(self) -> str:
        """One line: rows built, size on disk (a whole store) and wall time, or that it was skipped."""
        if self.skipped:
            return "complete and valid, skipped"
        if self.shard is not None:
            return f"{self.n_images} images, {self.seconds:.2f} s"
        return f"{self.n_images} images, {self.bytes_on_disk / 1e6:.1f} MB, {self.seconds:.2f} s"


def store_path(out: Path, name: str, fmt: str) -> Path:
    """Where dataset ``name`` is stored in ``out``: ``<out>/<name>.h5`` or ``.zarr``."""
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
    """The store's arrays for ``n`` rows of ``ds`` (default: all its rows)."""
    return array_specs(ds.n_images if n is None else n, ds.image.height_px, ds.image.width_px,
                       ds.particles.max_particles, ds.chunk_rows,
                       ds.output.expected, ds.output.trajectories,
                       ds.planes if ds.stack is not None else None, ds.trajectory_samples,
                       ds.frames_per_movie if ds.movie is not None else 1,
                       on_fraction=ds.particles.blinking is not None)


def batch_images(ds: Dataset) -> int:
    """Store rows per kernel call.

    Parameters
    ----------
    ds : Dataset
        The dataset.

    Returns
    -------
    int
        A multiple of the unit ``lcm(frames per movie, every array's rows per chunk)``,
        which divides ``ds.chunk_rows`` (so batches tile shards exactly): as many units
        as fit in ``BATCH_BYTES`` of the kernel's arrays, one unit when it alone is
        larger.  A chunk row of all the arrays takes at most ``stores.CHUNK_BYTES``
        (as much as ``BATCH_BYTES``), so the unit is larger only when one row, or one
        movie, alone is.
    """
    specs = specs_for(ds)
    movie = ds.frames_per_movie if ds.movie is not None else 1  # a stack row is a whole stack
    unit = math.lcm(movie, *(s.chunks[0] for s in specs))
    # The stored arrays plus the kernel's per-frame z truth (two float32, one float64).
    per_row = sum(math.prod(s.shape[1:]) * np.dtype(s.dtype).itemsize for s in specs)
    per_row += ds.planes * ds.particles.max_particles * 16
    return unit * max(1, BATCH_BYTES // (unit * per_row))


def disk_usage(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_output_dir(out: Path) -> None:
    """Create the output folder ``out`` if needed.

    Raises
    ------
    FactoryError
        ``out`` is a file, cannot be created, or is not writable.
    """
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
    pending, pending_n = None, 0
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
    """A tqdm bar of ``total`` images named ``desc`` (default: the dataset), shown only with ``progress``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc or ds.name, unit="img", disable=not progress, leave=True)


def build_dataset(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str = "hdf5",
                  progress: bool = True, overwrite: bool = True) -> BuildResult:
    """Write one dataset to ``<out>/<name>.h5|.zarr``.

    The caller holds the store's lock (``publish.store_lock``).  An existing store is
    replaced only with ``overwrite``, checked again when the new one is moved into place.
    """
    final = store_path(out, ds.name, fmt)
    tmp = tmp_name(final)
    t0 = time.perf_counter()
    bar = progress_bar(ds, ds.n_images, progress)
    try:
        writer = make_writer(fmt, tmp, specs_for(ds), store_attrs(cfg, ds, fmt), ds.output.compression)
        try:
            sums = write_range(cfg, ds, writer, 0, ds.n_images, 0, bar)
            shard = make_manifest(cfg, ds, fmt, 0, 1, 0, ds.n_images, sums)
            # The completeness mark, written after every array: readers refuse a store without it.
            writer.set_attrs({"shards": json.dumps([shard]), "complete": True})
        finally:
            writer.close()
        publish(tmp, final, overwrite)
    except BaseException:
        remove_path(tmp)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    log.info("built %s: %d images in %.2f s", final, ds.n_images, seconds)
    return BuildResult(ds.name, final, ds.n_images, seconds, disk_usage(final))


# --- entry points -------------------------------------------------------------------------


def select_for_build(cfg: FactoryConfig, out: Path, fmt: str, only: list[str] | None,
                     shard: tuple[int, int] | None = None, report=None) -> list[Dataset]:
    """The datasets to build, after every check that can run before any work.

    Parameters
    ----------
    cfg : FactoryConfig
        The config.
    out : Path
        The output folder.
    fmt : {"hdf5", "zarr"}
        The store format.
    only : list of str or None
        The dataset names (None: all).
    shard : tuple of int, optional
        ``(I, N)`` when building shard I of N of each dataset: the estimate and the
        free-space check cover that shard's rows.
    report : callable, optional
        Called with each line of the size estimate (default: logged at INFO level).

    Returns
    -------
    list of Dataset
        The datasets to build, in the order of ``only`` (else the config's).

    Raises
    ------
    FactoryError
        A bad format or name, an unusable output folder, or a disk that cannot hold the
        estimated stores (``sizes.check_space``); nothing is written before.
    """
    from .shards import shard_range
    from .sizes import check_space, describe, estimate

    if fmt not in FORMATS:
        raise FactoryError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    selected = cfg.select(only)
    if Path(out).exists():
        check_output_dir(Path(out))  # a file or an unwritable folder is the first thing to say
    lines = []
    estimates = []
    for ds in selected:
        start, stop, part = 0, ds.n_images, ""
        if shard is not None:
            start, stop = shard_range(ds.n_images, ds.chunk_rows, *shard)
            part = f" (shard {shard[0]}/{shard[1]}: rows {start}..{stop - 1})" if stop > start \
                else f" (shard {shard[0]}/{shard[1]}: empty)"
        estimates.append(estimate(cfg, ds, fmt, start, stop))
        lines.append(describe(estimates[-1], part))
    total = check_space(estimates, Path(out), cfg.source)  # refuses before anything is written
    for line in lines + [total]:
        (report or log.info)(line)
    check_output_dir(Path(out))
    return selected


def build(cfg: FactoryConfig, out: Path, fmt: str = "hdf5", only: list[str] | None = None,
          overwrite: bool = False, progress: bool = True, report=None) -> list[BuildResult]:
    """Build the selected datasets of ``cfg`` into ``out`` in this process (``factory.build_stores``).

    Every check (dataset names, output folder, free disk, existing stores) runs before
    any work.  Each store is written under a temporary name and renamed when complete,
    under a lock that a second build of the same store finds taken.
    (``factory.shards.build_shards`` builds one shard of each instead.)

    Parameters
    ----------
    cfg : FactoryConfig
        The validated config (``load_config``).
    out : Path
        The output folder, created if missing; dataset ``name`` is written to
        ``<out>/<name>.h5`` (HDF5) or ``<out>/<name>.zarr`` (Zarr).
    fmt : {"hdf5", "zarr"}
        The store format.
    only : list of str, optional
        The datasets to build, by name (None: every one).
    overwrite : bool
        Replace existing stores; without it an existing store is refused before any work.
    progress : bool
        A progress bar (stderr) per dataset, counting images.
    report : callable, optional
        Receives each line of the size estimate (default: this module's logger at INFO).

    Returns
    -------
    list of BuildResult
        One per dataset built, in the order built.

    Raises
    ------
    FactoryError
        A bad format or dataset name, an unusable output folder, too little free disk
        for the estimated stores, an existing store without ``overwrite``, or a store
        that another process is writing: all found before any work.  Also a store
        that appeared at its final path while this one was built, without ``overwrite``.

    Examples
    --------
    >>> from factory import build_stores, load_config
    >>> results = build_stores(load_config("datasets.yaml"), "data", only=["val"])  # doctest: +SKIP
    """
    selected = select_for_build(cfg, out, fmt, only, report=report)
    out = Path(out)
    finals = [store_path(out, d.name, fmt) for d in selected]
    # Every store's lock is taken before any work: a second build of one of them stops
    # here, and one that started first cannot have its files removed under it.
    with store_locks(finals):
        if not overwrite:
            existing = [str(p) for p in finals if p.exists()]
            if existing:
                raise FactoryError(f"{existing[0]}: already exists (use --overwrite to replace it)")
        return [build_dataset(cfg, ds, out, fmt, progress, overwrite) for ds in selected]


def build_from_config(config: str | Path, out: str | Path, fmt: str = "hdf5", only: list[str] | None = None,
                      overwrite: bool = False, shard: str | tuple[int, int] | None = None, progress: bool = True,
                      report=None) -> list[BuildResult]:
    """Build the datasets of a datasets YAML: whole stores, or one shard of each (``factory.build_from_config``).

    Reads and checks the config (``load_config``), then builds every selected dataset
    into a store in this process (``build_stores``) or, given ``shard``, shard I of N of
    each (``build_shards``; `factory finalize` assembles them once all N are built).

    Parameters
    ----------
    config : str or Path
        The datasets YAML.
    out : str or Path
        The output folder, created if missing: ``<out>/<name>.h5`` or ``.zarr``, or for
        shards ``<out>/<name>.shards/`` (HDF5) or ``<out>/<name>.zarr.shards/`` (Zarr).
    fmt : {"hdf5", "zarr"}
        The store format.
    only : list of str, optional
        The datasets to build, by name (None: every one).
    overwrite : bool
        Replace existing stores; with ``shard``, rebuild the shard even when it is
        complete and valid (otherwise it is skipped).
    shard : str or tuple of int, optional
        ``"I/N"`` (I from 0), ``"auto"`` (from SLURM's array variables, see
        ``parse_shard``) or ``(I, N)``; None builds whole stores.
    progress : bool
        Progress bars (stderr), one per dataset.
    report : callable, optional
        Where the size estimate goes, line by line (default: the log, at INFO level).

    Returns
    -------
    list of BuildResult
        One per dataset, in the order built (a shard's ``path`` is its manifest); each
        one's ``summary()`` is what `factory build` prints after its path.

    Raises
    ------
    FactoryError
        A missing or invalid config (``ConfigError``), then a bad ``shard``, then
        whatever ``build_stores`` or ``build_shards`` refuses, all before any work.

    Examples
    --------
    >>> from factory import build_from_config
    >>> for r in build_from_config("datasets.yaml", "data", shard="0/8"):  # doctest: +SKIP
    ...     print(f"{r.path}: {r.summary()}")
    """
    from .config import load_config
    from .shards import build_shards, parse_shard

    cfg = load_config(config)
    if shard is None:
        return build(cfg, out, fmt, only, overwrite, progress=progress, report=report)
    spec = parse_shard(shard) if isinstance(shard, str) else shard
    return build_shards(cfg, out, fmt, only, spec, overwrite, progress=progress, report=report)
