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

Zarr: the first task creates ``<out>/<name>.zarr`` (in a temporary folder renamed into
place, so of several tasks started at once exactly one wins); each shard writes its
chunk-aligned region directly and then its manifest into ``<out>/<name>.zarr.shards/``.
``finalize`` checks the shards, records them in the store and consolidates the metadata.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .build import (BuildResult, progress_bar, remove_stale, select_for_build, specs_for, store_attrs,
                    store_path, tmp_name, write_range)
from .checksums import (Checksums, checksum_mismatch, make_manifest, read_manifest, region_checksums,
                        write_json_atomic)
from .config import Dataset, FactoryConfig, dataset_hash
from .errors import FactoryError, StoreError
from .stores import HDF5Writer, Store, ZarrWriter, remove_path

log = logging.getLogger(__name__)


# --- shard arithmetic ---------------------------------------------------------------------


def parse_shard(spec: str, env: dict | None = None) -> tuple[int, int]:
    """``"I/N"`` (I from 0) or ``"auto"`` (from SLURM's array variables)."""
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
    return f"shard-{index:05d}-of-{count:05d}"


def shards_dir(out: Path, name: str, fmt: str) -> Path:
    return Path(out) / (f"{name}.shards" if fmt == "hdf5" else f"{name}.zarr.shards")


# --- checking shards ----------------------------------------------------------------------


@dataclass
class ShardProblem:
    index: int
    count: int
    reason: str

    def __str__(self) -> str:
        return f"{shard_stem(self.index, self.count)} ({self.reason})"


def _deep_check(path: Path, m: dict, offset: int) -> str | None:
    try:
        with Store(path) as st:
            arrays = {n: st[n] for n in m["checksums"]}
            sums = region_checksums(arrays, m["start"] - offset, m["stop"] - offset, st.chunk_rows * 16)
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
    return _check_zarr_shard(Path(out) / f"{ds.name}.zarr", sdir, index, count, h, deep)


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
    """Create the shared Zarr store once, however many tasks try at the same moment."""
    final = store_path(out, ds.name, "zarr")
    expect = dataset_hash(cfg.seed, ds)
    if not final.exists():
        tmp = tmp_name(final)
        ZarrWriter(tmp, specs_for(ds), {**store_attrs(cfg, ds, "zarr"), "complete": False})
        try:
            os.rename(tmp, final)  # atomic: one creator wins, the others find it there
        except OSError:
            remove_path(tmp)
    try:
        with Store(final) as st:
            found = st.attrs.get("dataset_hash")
    except StoreError:
        found = None
    if found != expect:
        raise StoreError(f"{final}: exists but was built from another config (dataset hash {found}, "
                         f"expected {expect}); remove it or build into another --out")
    return final


def build_shard(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str, index: int, count: int,
                redo: bool = False, progress: bool = True) -> BuildResult:
    """Build shard ``index`` of ``count`` of ``ds``; skip it when already complete and valid."""
    start, stop = shard_range(ds.n_images, ds.chunk_rows, index, count)
    sdir = shards_dir(out, ds.name, fmt)
    sdir.mkdir(parents=True, exist_ok=True)
    found = discover_count(sdir)
    if found is not None and found != count:
        raise StoreError(f"{sdir}: holds shards of a {found}-way split, not {count}; "
                         f"use --shard I/{found} or remove the folder")
    stem = shard_stem(index, count)
    manifest = sdir / f"{stem}.json"
    desc = f"{ds.name} {index}/{count}"
    if not redo and manifest.exists():
        if fmt == "zarr":
            ensure_zarr_store(cfg, ds, out)
        problem = check_shard(cfg, ds, out, fmt, index, count)
        if problem is None:
            log.info("%s shard %d/%d is complete: skipped", ds.name, index, count)
            return BuildResult(ds.name, manifest, stop - start, 0.0, 0, skipped=True)
        log.warning("%s shard %d/%d: %s; rebuilding it", ds.name, index, count, problem)
    # The manifest marks completion: remove it first so a crash never leaves a stale one.
    remove_path(manifest)
    t0 = time.perf_counter()
    bar = progress_bar(ds, stop - start, progress, desc)
    try:
        if fmt == "hdf5":
            data = sdir / f"{stem}.h5"
            remove_stale(data)
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
            final = ensure_zarr_store(cfg, ds, out)
            writer = ZarrWriter(final, specs_for(ds), {}, create=False)
            sums = write_range(cfg, ds, writer, start, stop, 0, bar)
        write_json_atomic(manifest, make_manifest(cfg, ds, fmt, index, count, start, stop, sums))
    finally:
        bar.close()
    return BuildResult(ds.name, manifest, stop - start, time.perf_counter() - t0, 0)



def build_shards(cfg: FactoryConfig, out: Path, fmt: str, only: list[str] | None, shard: tuple[int, int],
                 redo: bool = False, progress: bool = True) -> list[BuildResult]:
    """Build shard ``shard = (I, N)`` of every selected dataset (checks first, then work)."""
    selected = select_for_build(cfg, out, fmt, only)
    return [build_shard(cfg, ds, Path(out), fmt, shard[0], shard[1], redo, progress) for ds in selected]
