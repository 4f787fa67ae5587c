"""Sharded builds for HPC array jobs: shard, resume, finalize and verify.

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

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .config import Dataset, FactoryConfig, dataset_hash
from .errors import FactoryError, StoreError

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


# --- checksums ----------------------------------------------------------------------------


class Checksums:
    """Streaming BLAKE2b of each array's bytes, in image order."""

    def __init__(self, names):
        self._h = {n: hashlib.blake2b(digest_size=16) for n in names}

    def update(self, arrays: dict) -> None:
        for name, h in self._h.items():
            h.update(np.ascontiguousarray(arrays[name]).data)

    def hexdigest(self) -> dict:
        return {n: h.hexdigest() for n, h in self._h.items()}


def region_checksums(store_arrays: dict, start: int, stop: int, step: int) -> dict:
    """Checksums of rows [start, stop) of arrays that support slicing (read in blocks)."""
    c = Checksums(list(store_arrays))
    for a in range(start, stop, step):
        b = min(a + step, stop)
        c.update({n: np.asarray(arr[a:b]) for n, arr in store_arrays.items()})
    return c.hexdigest()


# --- manifests ----------------------------------------------------------------------------


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def make_manifest(cfg: FactoryConfig, ds: Dataset, fmt: str, index: int, count: int,
                  start: int, stop: int, checksums: dict) -> dict:
    return {
        "dataset": ds.name, "format": fmt, "shard": index, "shards": count,
        "start": start, "stop": stop, "dataset_hash": dataset_hash(cfg.seed, ds),
        "checksums": checksums, "package_version": __version__,
        "host": socket.gethostname(),
    }


# --- checking shards ----------------------------------------------------------------------


@dataclass
class ShardProblem:
    index: int
    count: int
    reason: str

    def __str__(self) -> str:
        return f"{shard_stem(self.index, self.count)} ({self.reason})"


def checksum_mismatch(expected: dict, sums: dict) -> str | None:
    bad = [n for n in sums if sums[n] != expected.get(n)]
    return f"checksum mismatch in {', '.join(bad)}" if bad else None


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
    if not deep:
        return None
    try:
        with h5py.File(path, "r") as f:
            arrays = {n: f[n] for n in m["checksums"]}
            step = int(f["images"].chunks[0]) * 16
            sums = region_checksums(arrays, 0, m["stop"] - m["start"], step)
    except (OSError, KeyError, ValueError) as exc:
        return f"unreadable: {str(exc).splitlines()[0]}"
    return checksum_mismatch(m["checksums"], sums)


def _check_zarr_shard(store_path: Path, sdir: Path, index: int, count: int, expect_hash: str,
                      deep: bool) -> str | None:
    import zarr

    stem = shard_stem(index, count)
    m = read_manifest(sdir / f"{stem}.json")
    if m is None:
        return "missing"
    if m.get("dataset_hash") != expect_hash:
        return "built from another config"
    if not deep or m["start"] == m["stop"]:
        return None
    try:
        g = zarr.open_group(str(store_path), mode="r")
        arrays = {n: g[n] for n in m["checksums"]}
        step = int(g["images"].chunks[0]) * 16
        sums = region_checksums(arrays, m["start"], m["stop"], step)
    except (OSError, KeyError, ValueError) as exc:
        return f"unreadable: {str(exc).splitlines()[0]}"
    return checksum_mismatch(m["checksums"], sums)


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
