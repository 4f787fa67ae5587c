"""Chunked HDF5 and Zarr stores: one layout, two formats.

Layout (N images, P = max particles per image, T = H * W pixel time steps):

=================  ==============  =======  ==========================================
name               shape           dtype    meaning
=================  ==============  =======  ==========================================
images             (N, H, W)       uint16   recorded photon counts (ADU for a PMT)
expected           (N, H, W)       float32  noise-free expected photons (optional)
n_particles        (N,)            int32    particles in the image
centroids          (N, P, 2)       float32  trajectory centroids (x, y) px, NaN padded
trajectories       (N, P, T, 3)    float32  (x px, y px, z um) per pixel step (optional)
diffusion          (N, P)          float32  D in um^2/s, NaN padded
n_qd               (N, P)          float32  particle brightness N_qd, NaN padded
=================  ==============  =======  ==========================================

Every array is chunked along N only, so a chunk holds whole images, and compressed
with Blosc (LZ4, byte shuffle); HDF5 readers need the Blosc filter, which
``import hdf5plugin`` registers with h5py.  Root attributes
carry the validated config, the package version, the units and the coordinate
convention.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # registers the Blosc filter with HDF5 for writing and reading
import numpy as np

from .errors import StoreError

UNITS = {
    "images": "photons (ADU for the PMT detector)",
    "expected": "photons",
    "n_particles": "count",
    "centroids": "px (x = column, y = row)",
    "trajectories": "x px, y px, z um",
    "diffusion": "um^2/s",
    "n_qd": "photons (Eq. 1 N_qd)",
}
COORDINATES = (
    "pixels; x = column, y = row; origin at the centre of pixel (0, 0) (TrackPy's convention)"
)
FORMATS = {"hdf5": ".h5", "zarr": ".zarr"}


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: Any
    chunks: tuple[int, ...]
    fill: Any


def array_specs(n: int, height: int, width: int, max_particles: int, chunk: int,
                expected: bool = True, trajectories: bool = True) -> list[ArraySpec]:
    """The arrays of a store of ``n`` images, in write order."""
    P, T, c = max_particles, height * width, min(chunk, n)
    specs = [ArraySpec("images", (n, height, width), np.uint16, (c, height, width), 0)]
    if expected:
        specs.append(ArraySpec("expected", (n, height, width), np.float32, (c, height, width), np.nan))
    specs += [
        ArraySpec("n_particles", (n,), np.int32, (c,), -1),
        ArraySpec("centroids", (n, P, 2), np.float32, (c, P, 2), np.nan),
    ]
    if trajectories:
        specs.append(ArraySpec("trajectories", (n, P, T, 3), np.float32, (c, P, T, 3), np.nan))
    specs += [
        ArraySpec("diffusion", (n, P), np.float32, (c, P), np.nan),
        ArraySpec("n_qd", (n, P), np.float32, (c, P), np.nan),
    ]
    return specs


def store_format(path: str | Path) -> str:
    """'hdf5' or 'zarr' from a store's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return "hdf5"
    if suffix == ".zarr":
        return "zarr"
    raise StoreError(f"{path}: unknown store type (expected a .h5 or .zarr path)")


# --- writing -------------------------------------------------------------------------


class HDF5Writer:
    """Writes a new HDF5 store; each array is created chunked and compressed."""

    def __init__(self, path: Path, specs: list[ArraySpec], attrs: dict):
        self.path = Path(path)
        self.file = h5py.File(self.path, "w", libver="latest")
        for key, value in attrs.items():
            self.file.attrs[key] = value
        self.arrays = {}
        for s in specs:
            self.arrays[s.name] = self.file.create_dataset(
                s.name, shape=s.shape, dtype=s.dtype, chunks=s.chunks, fillvalue=s.fill,
                **hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE),
            )
            self.arrays[s.name].attrs["units"] = UNITS[s.name]

    def write(self, start: int, batch: dict) -> None:
        for name, dset in self.arrays.items():
            data = batch[name]
            dset[start:start + len(data)] = data

    def set_attrs(self, attrs: dict) -> None:
        for key, value in attrs.items():
            self.file.attrs[key] = value

    def close(self) -> None:
        self.file.close()


def _zarr_compressor():
    from zarr.codecs import BloscCodec

    # The same codec as the HDF5 stores: Blosc LZ4 with byte shuffle.  It compresses at
    # about 1 GB/s, so storage stays a fraction of the kernel's time (zlib/zstd do not).
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


class ZarrWriter:
    """Writes (or, for shards, opens) a Zarr v3 group with one array per field."""

    def __init__(self, path: Path, specs: list[ArraySpec], attrs: dict, create: bool = True):
        import zarr

        self.path = Path(path)
        if create:
            self.group = zarr.open_group(str(self.path), mode="w", zarr_format=3)
            self.group.attrs.update(attrs)
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
        for name, arr in self.arrays.items():
            data = batch[name]
            arr[start:start + len(data)] = data

    def set_attrs(self, attrs: dict) -> None:
        self.group.attrs.update(attrs)

    def close(self) -> None:
        pass


def make_writer(fmt: str, path: Path, specs: list[ArraySpec], attrs: dict):
    if fmt == "hdf5":
        return HDF5Writer(path, specs, attrs)
    return ZarrWriter(path, specs, attrs)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(src: Path, dst: Path) -> None:
    """Move a finished store into place; an existing destination is replaced."""
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
    """

    def __init__(self, path: str | Path):
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
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"{self.path}: cannot open as {self.format}: {exc}") from None
        if "images" not in self.names:
            self.close()
            raise StoreError(f"{self.path}: not a dataset store (no 'images' array)")

    @property
    def names(self) -> list[str]:
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
        return json.loads(self.attrs["config"])

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self[name][start:stop])

    def close(self) -> None:
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
