"""Checksums and manifests: how a build proves that a store (or a shard) is whole.

Every finished store records, per shard (one shard for a single-process build), the
image range it covers, the config hash, and a BLAKE2b checksum of each array's bytes.
A shard's manifest is written last, so a shard without one is not complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np

from . import __version__
from .config import Dataset, FactoryConfig, dataset_hash


class Checksums:
    """Streaming BLAKE2b of each array's bytes, in image order."""

    def __init__(self, names):
        self._h = {n: hashlib.blake2b(digest_size=16) for n in names}

    def update(self, arrays: dict) -> None:
        """Add the next rows: ``arrays`` maps each name to its rows (contiguous bytes hashed)."""
        for name, h in self._h.items():
            h.update(np.ascontiguousarray(arrays[name]).data)

    def hexdigest(self) -> dict:
        """Each array's checksum so far (32 hex digits), by name."""
        return {n: h.hexdigest() for n, h in self._h.items()}


def region_checksums(store_arrays: dict, start: int, stop: int, step: int) -> dict:
    """Checksums of rows [start, stop) of arrays that support slicing (read in blocks)."""
    c = Checksums(list(store_arrays))
    for a in range(start, stop, step):
        b = min(a + step, stop)
        c.update({n: np.asarray(arr[a:b]) for n, arr in store_arrays.items()})
    return c.hexdigest()


def checksum_mismatch(expected: dict, sums: dict) -> str | None:
    """None when the checksums agree, else which arrays differ."""
    bad = [n for n in sums if sums[n] != expected.get(n)]
    return f"checksum mismatch in {', '.join(bad)}" if bad else None


def make_manifest(cfg: FactoryConfig, ds: Dataset, fmt: str, index: int, count: int,
                  start: int, stop: int, checksums: dict) -> dict:
    """The manifest of shard ``index`` of ``count``: rows [start, stop), hash, checksums, version, host."""
    return {
        "dataset": ds.name, "format": fmt, "shard": index, "shards": count,
        "start": start, "stop": stop, "dataset_hash": dataset_hash(cfg.seed, ds),
        "checksums": checksums, "package_version": __version__,
        "host": socket.gethostname(),
    }


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict | None:
    """The JSON of a manifest file; None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
