"""Sharded builds for HPC array jobs: shard arithmetic, building and checking a shard.

A dataset of N images split into S shards: shard i covers a run of whole chunks, so no
two shards ever write the same chunk.  Because every image has its own random stream,
the bytes do not depend on S.

HDF5: shard i writes ``<out>/<name>.shards/shard-0000i-of-0000S.h5`` under a temporary
name, renamed when complete, then its manifest ``shard-...json`` (index range, config
hash, per-array checksums, package version).  The manifest is written last, so a shard
without one is not complete, whatever else is there.  ``finalize`` checks every shard and
writes ``<out>/<name>.h5`` as a virtual dataset over the shard files (or, with ``copy``,
one self-contained file).

Zarr: the first task creates the shared store ``<out>/<name>.zarr.shards/<name>.zarr``
(under the folder's lock, in a temporary folder renamed into place); each shard writes
its chunk-aligned region directly and then its manifest into the same folder.
``finalize`` checks the shards, records them in the store, consolidates the metadata and
only then moves it to ``<out>/<name>.zarr``: an unfinished build is never visible under
the final name.

Each shard is built under its own lock (``publish.store_lock``), so a shard resubmitted
while its first run is still going stops at once instead of writing beside it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .build import BuildResult, progress_bar, select_for_build, specs_for, store_attrs, store_path, write_range
from .checksums import (Checksums, checksum_mismatch, make_manifest, read_manifest, region_checksums,
                        write_json_atomic)
from .config import Dataset, FactoryConfig, dataset_hash
from .errors import FactoryError, StoreError
from .publish import remove_stale, store_lock, tmp_name
from .stores import HDF5Writer, Store, ZarrWriter, remove_path, rows_per_read

log = logging.getLogger(__name__)


# --- shard arithmetic ---------------------------------------------------------------------


def parse_shard(spec: str, env: dict | None = None) -> tuple[int, int]:
    """Shard ``(I, N)`` from ``--shard``: ``"I/N"`` (I from 0) or ``"auto"``.

    ``"auto"`` reads SLURM's array variables (``SLURM_ARRAY_TASK_ID``,
    ``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_MIN``) from ``env`` (default: the
    process environment).

    Raises
    ------
    FactoryError
        Not of either form, a variable missing or not an integer, or not 0 <= I < N.
    """
    env = os.environ if env is None else env
    if spec == "auto":
        try:
            task = int(env["SLURM_ARRAY_TASK_ID"])
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        except KeyError as exc:
            raise FactoryError(f"--shard auto: {exc.args[0]} is not set (not inside a SLURM array job?)") from None
        except ValueError:
            raise FactoryError("--shard auto: SLURM_ARRAY_TASK_* variables are not integers") from None
        index = task - first
    else:
        try:
            a, b = spec.split("/")
            index, count = int(a), int(b)
        except ValueError:
            raise FactoryError(f"--shard {spec}: expected I/N (e.g. 0/8, I counted from 0) or auto") from None
    if count < 1 or not 0 <= index < count:
        raise FactoryError(f"--shard {spec}: need 0 <= I < N (got I={index}, N={count})")
    return index, count


def shard_range(n_images: int, chunk: int, index: int, count: int) -> tuple[int, int]:
    """Images [start, stop) of shard ``index`` of ``count``: whole chunks, balanced."""
    n_chunks = -(-n_images // chunk)
    a = index * n_chunks // count
    b = (index + 1) * n_chunks // count
    return min(a * chunk, n_images), min(b * chunk, n_images)


def shard_stem(index: int, count: int) -> str:
    """File stem of a shard: ``shard-0000I-of-0000N``."""
    return f"shard-{index:05d}-of-{count:05d}"


def shards_dir(out: Path, name: str, fmt: str) -> Path:
    """The folder of a dataset's shards: ``<out>/<name>.shards`` (HDF5) or ``<name>.zarr.shards``."""
    return Path(out) / (f"{name}.shards" if fmt == "hdf5" else f"{name}.zarr.shards")


def zarr_work_path(out: Path, name: str) -> Path:
    """Where the shards of a Zarr build write, until ``finalize`` moves the store out."""
    return shards_dir(out, name, "zarr") / f"{name}.zarr"


def zarr_data_path(out: Path, name: str) -> Path:
    """The Zarr store that holds the shards' data: the one being built, else the finalized one."""
    work = zarr_work_path(out, name)
    final = store_path(out, name, "zarr")
    return final if not work.exists() and final.exists() else work


# --- checking shards ----------------------------------------------------------------------


@dataclass
class ShardProblem:
    """Why shard ``index`` of ``count`` is not usable."""

    index: int
    count: int
    reason: str

    def __str__(self) -> str:
        return f"{shard_stem(self.index, self.count)} ({self.reason})"


def _deep_check(path: Path, m: dict, offset: int) -> str | None:
    try:
        with Store(path, complete=False) as st:
            arrays = {n: st[n] for n in m["checksums"]}
            sums = region_checksums(arrays, m["start"] - offset, m["stop"] - offset,
                                    rows_per_read(list(arrays.values())))
    except (StoreError, OSError, KeyError, ValueError) as exc:
        return f"unreadable: {str(exc).splitlines()[0]}"
    return checksum_mismatch(m["checksums"], sums)


def _check_hdf5_shard(sdir: Path, index: int, count: int, expect_hash: str, deep: bool) -> str | None:
    stem = shard_stem(index, count)
    m = read_manifest(sdir / f"{stem}.json")
    if m is None:
        return "missing" if not (sdir / f"{stem}.h5").exists() else "no manifest: incomplete"
    if m.get("dataset_hash") != expect_hash:
        return "built from another config"
    if m["start"] == m["stop"]:
        return None
    path = sdir / f"{stem}.h5"
    if not path.exists():
        return "data file missing"
    return _deep_check(path, m, m["start"]) if deep else None


def _check_zarr_shard(store_path: Path, sdir: Path, index: int, count: int, expect_hash: str,
                      deep: bool) -> str | None:
    stem = shard_stem(index, count)
    m = read_manifest(sdir / f"{stem}.json")
    if m is None:
        return "missing"
    if m.get("dataset_hash") != expect_hash:
        return "built from another config"
    if not deep or m["start"] == m["stop"]:
        return None
    return _deep_check(store_path, m, 0)


def check_shard(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str, index: int, count: int,
                deep: bool = True) -> str | None:
    """None when shard ``index`` of ``count`` is complete and valid, else why not."""
    sdir = shards_dir(out, ds.name, fmt)
    h = dataset_hash(cfg.seed, ds)
    if fmt == "hdf5":
        return _check_hdf5_shard(sdir, index, count, h, deep)
    return _check_zarr_shard(zarr_data_path(out, ds.name), sdir, index, count, h, deep)


def discover_count(sdir: Path) -> int | None:
    """The shard count used for a dataset, from the manifests (and data files) present."""
    counts = set()
    if sdir.exists():
        for p in sdir.iterdir():
            if p.name.startswith("shard-") and p.suffix in (".json", ".h5"):
                try:
                    counts.add(int(p.stem.split("-of-")[1]))
                except (IndexError, ValueError):
                    continue
    if len(counts) > 1:
        raise StoreError(f"{sdir}: shards of different splits ({', '.join(map(str, sorted(counts)))}); "
                         "remove the folder and rebuild with one --shard N")
    return counts.pop() if counts else None


# --- building shards -------------------------------------------------------------------------


def ensure_zarr_store(cfg: FactoryConfig, ds: Dataset, out: Path) -> Path:
    """The shared Zarr store of a sharded build, created once.

    However many tasks start at the same moment, one creates it: they wait for each
    other's lock, which is held only to create it.

    Raises
    ------
    StoreError
        The store exists but was built from another config.
    """
    work = zarr_work_path(out, ds.name)
    expect = dataset_hash(cfg.seed, ds)
    if not work.exists():
        with store_lock(work, wait=True):
            if not work.exists():
                tmp = tmp_name(work)
                ZarrWriter(tmp, specs_for(ds), {**store_attrs(cfg, ds, "zarr"), "complete": False})
                os.rename(tmp, work)
    try:
        with Store(work, complete=False) as st:
            found = st.attrs.get("dataset_hash")
    except StoreError:
        found = None
    if found != expect:
        raise StoreError(f"{work}: exists but was built from another config (dataset hash {found}, "
                         f"expected {expect}); remove {work.parent} or build into another --out")
    return work


def build_shard(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str, index: int, count: int,
                redo: bool = False, progress: bool = True) -> BuildResult:
    """Build shard ``index`` of ``count`` of ``ds``; skip it when already complete and valid."""
    sdir = shards_dir(out, ds.name, fmt)
    sdir.mkdir(parents=True, exist_ok=True)
    found = discover_count(sdir)
    if found is not None and found != count:
        raise StoreError(f"{sdir}: holds shards of a {found}-way split, not {count}; "
                         f"use --shard I/{found} or remove the folder")
    with store_lock(sdir / shard_stem(index, count)):
        return _build_shard_locked(cfg, ds, Path(out), fmt, index, count, redo, progress)


def _build_shard_locked(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str, index: int, count: int,
                        redo: bool, progress: bool) -> BuildResult:
    start, stop = shard_range(ds.n_images, ds.chunk_rows, index, count)
    sdir = shards_dir(out, ds.name, fmt)
    stem = shard_stem(index, count)
    manifest = sdir / f"{stem}.json"
    finalized = fmt == "zarr" and zarr_data_path(out, ds.name) != zarr_work_path(out, ds.name)
    if not redo and manifest.exists():
        if fmt == "zarr" and not finalized:
            ensure_zarr_store(cfg, ds, out)
        problem = check_shard(cfg, ds, out, fmt, index, count)
        if problem is None:
            log.info("%s shard %d/%d is complete: skipped", ds.name, index, count)
            return BuildResult(ds.name, manifest, stop - start, 0.0, 0, skipped=True, shard=(index, count))
        log.warning("%s shard %d/%d: %s; rebuilding it", ds.name, index, count, problem)
    if finalized:  # its shards live in the published store now: never write into that
        raise StoreError(f"{store_path(out, ds.name, fmt)}: already finalized; remove it and {sdir} "
                         "to rebuild its shards")
    # The manifest marks completion: remove it first so a crash never leaves a stale one.
    remove_path(manifest)
    t0 = time.perf_counter()
    bar = progress_bar(ds, stop - start, progress, f"{ds.name} {index}/{count}")
    try:
        if fmt == "hdf5":
            data = sdir / f"{stem}.h5"
            remove_stale(data)  # earlier attempts' files: their owners are gone (we hold the lock)
            remove_path(data)
            if stop > start:
                tmp = tmp_name(data)
                try:
                    attrs = {**store_attrs(cfg, ds), "shard": index, "shards": count,
                             "start": start, "stop": stop}
                    writer = HDF5Writer(tmp, specs_for(ds, stop - start), attrs, ds.output.compression)
                    try:
                        sums = write_range(cfg, ds, writer, start, stop, start, bar)
                    finally:
                        writer.close()
                    os.replace(tmp, data)
                except BaseException:
                    remove_path(tmp)
                    raise
            else:
                sums = Checksums([s.name for s in specs_for(ds, 1)]).hexdigest()
        else:
            work = ensure_zarr_store(cfg, ds, out)
            writer = ZarrWriter(work, specs_for(ds), {}, create=False)
            sums = write_range(cfg, ds, writer, start, stop, 0, bar)
        write_json_atomic(manifest, make_manifest(cfg, ds, fmt, index, count, start, stop, sums))
    finally:
        bar.close()
    return BuildResult(ds.name, manifest, stop - start, time.perf_counter() - t0, 0, shard=(index, count))


def build_shards(cfg: FactoryConfig, out: Path, fmt: str, only: list[str] | None, shard: tuple[int, int],
                 redo: bool = False, progress: bool = True, report=None) -> list[BuildResult]:
    """Build shard ``shard = (I, N)`` of every selected dataset (``factory.build_shards``).

    The checks of ``build_stores`` (names, output folder, free disk for this shard's
    rows) run first, then the work.  A shard found complete and valid is skipped.
    ``finalize_stores`` assembles the shards once all N are built.

    Parameters
    ----------
    cfg : FactoryConfig
        The validated config (``load_config``).
    out : Path
        The output folder; shards go to ``<out>/<name>.shards/`` (HDF5) or
        ``<out>/<name>.zarr.shards/`` (Zarr).
    fmt : {"hdf5", "zarr"}
        The store format.
    only : list of str or None
        The datasets, by name (None: every one).
    shard : tuple of int
        ``(I, N)``: shard I (from 0) of N (``parse_shard`` reads ``--shard``); every
        task of one build must use the same N.
    redo : bool
        Rebuild the shard even when it is complete and valid.
    progress : bool
        A progress bar (stderr) per dataset, counting images.
    report : callable, optional
        Receives each line of the size estimate (default: logged at INFO level).

    Returns
    -------
    list of BuildResult
        One per dataset; ``path`` is the shard's manifest.

    Raises
    ------
    FactoryError
        A bad format or dataset name, an unusable output folder or too little free
        disk (before any work); shards of another N in the folder; a Zarr dataset
        already finalized, or its store built from another config; the shard being
        built by another process.
    """
    selected = select_for_build(cfg, out, fmt, only, shard, report=report)
    return [build_shard(cfg, ds, Path(out), fmt, shard[0], shard[1], redo, progress) for ds in selected]
