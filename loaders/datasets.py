"""PyTorch Datasets over factory stores (HDF5 or Zarr, chosen by the path).

Files are opened lazily, in the process that reads: the constructor opens the store
only long enough to read its length and attributes and closes it again, so nothing
open is inherited by a forked DataLoader worker (an HDF5 handle shared across fork can
deadlock or return garbage), and the Dataset pickles cleanly for spawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from factory.errors import StoreError
from factory.stores import Store

# Training targets: the store array holding each one's (x, y) per image and particle,
# and in stack stores the one holding its z (um).
TARGETS = {"centroid": "centroids", "exposure": "exposure_xy"}
TARGETS_Z = {"centroid": "centroid_z_um", "exposure": "exposure_z_um"}


def stack_points(xy: np.ndarray, z_um: np.ndarray, plane_z_um: np.ndarray, n_particles: np.ndarray,
                 in_view: np.ndarray) -> np.ndarray:
    """(N, P, 3) voxel coordinates (x px, y px, z in planes from the first plane) of a stack store's targets.

    NaN where a particle is not one.  Targets are the first ``n_particles`` slots whose
    centroid lies in the field (``in_view``) and whose z lies within half a step of the
    planes.  ``xy`` (N, P, 2) px, ``z_um`` (N, P) um, ``plane_z_um`` (N, Z) um.
    """
    plane_z_um = np.asarray(plane_z_um, np.float64)
    Z = plane_z_um.shape[1]
    step = plane_z_um[:, 1:2] - plane_z_um[:, :1] if Z > 1 else np.ones((len(plane_z_um), 1))
    zi = (np.asarray(z_um, np.float64) - plane_z_um[:, :1]) / step
    pts = np.concatenate([np.asarray(xy, np.float32), zi[..., None].astype(np.float32)], -1)
    keep = np.arange(pts.shape[1])[None, :] < np.asarray(n_particles)[:, None]
    keep &= np.asarray(in_view).astype(bool)
    with np.errstate(invalid="ignore"):
        keep &= (zi >= -0.5) & (zi <= Z - 0.5)
    pts[~keep] = np.nan
    return pts


def truth_points(points: np.ndarray, n_particles: np.ndarray, in_view: np.ndarray | None,
                 movie: bool, height: int, width: int) -> np.ndarray:
    """(N, P, 2) target points with NaN where a particle is not a detection target.

    Images: the first ``n_particles`` slots (the paper's convention, whatever the
    centroid).  Movies: particles whose centroid lies in the field (``in_view``), and for
    the exposure target also whose exposure position does (a particle just outside
    lights the edge pixels but is not in the recording).  ``points`` (N, P, 2) px of
    ``height`` x ``width`` px frames; a new float32 array.
    """
    pts = np.array(points, np.float32, copy=True)
    keep = np.arange(pts.shape[1])[None, :] < np.asarray(n_particles)[:, None]
    if movie:
        keep &= np.asarray(in_view).astype(bool)
        x, y = pts[..., 0], pts[..., 1]
        with np.errstate(invalid="ignore"):
            keep &= (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    pts[~keep] = np.nan
    return pts


def store_targets(store: Store, target: str = "centroid", start: int = 0, stop: int | None = None) -> np.ndarray:
    """The detection targets of rows ``start .. stop`` of a store of any kind.

    NaN where a slot is not one: (N, P, 2) pixels for images and movies
    (``truth_points``), (N, P, 3) voxels for stacks (``stack_points``).  The one reader
    of a store's truth; StoreError when the store lacks the target's arrays.
    """
    if TARGETS[target] not in store:
        raise StoreError(f"{store.path}: no {TARGETS[target]} array for the {target} target (rebuild the store)")
    n = store.read("n_particles", start, stop)
    if store.kind == "stacks":
        if TARGETS_Z[target] not in store:
            raise StoreError(f"{store.path}: no {TARGETS_Z[target]} array for the {target} target (rebuild the store)")
        return stack_points(store.read(TARGETS[target], start, stop), store.read(TARGETS_Z[target], start, stop),
                            store.read("plane_z_um", start, stop), n, store.read("in_view", start, stop))
    movie = store.kind == "movies"
    h, w = store["images"].shape[1:]
    return truth_points(store.read(TARGETS[target], start, stop), n,
                        store.read("in_view", start, stop) if movie else None, movie, h, w)


class _LazyStore:
    """A Store opened on first use in each process (re-opened after a fork)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._store = None
        self._pid = None
        self._small = None
        with Store(self.path) as st:
            self.length = len(st)
            self.names = st.names
            self.attrs = dict(st.attrs)
            self.image_shape = tuple(st["images"].shape[1:])
            self.chunk = st.chunk_rows
            self.max_particles = int(st["centroids"].shape[1])
            self.movie = st.kind == "movies"
            self.stack = st.kind == "stacks"

    def get(self) -> Store:
        if self._store is None or self._pid != os.getpid():
            self._store = Store(self.path)
            self._pid = os.getpid()
            self._small = None
        return self._store

    SMALL = ("centroids", "n_particles", "diffusion", "exposure_xy", "in_view", "centroid_z_um",
             "exposure_z_um", "plane_z_um")
    SMALL_LIMIT = 64 * 2**20  # bytes of per-image metadata worth holding in memory

    def small(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows a..b of a per-image metadata array, from memory when it is small.

        Reading these whole once per process saves three reads per batch (each read of
        a Zarr array costs about a millisecond however small).
        """
        st = self.get()
        if self._small is None:
            names = [n for n in self.SMALL if n in st]
            size = sum(np.prod(st[n].shape) * st[n].dtype.itemsize for n in names)
            self._small = {n: st.read(n) for n in names} if size <= self.SMALL_LIMIT else {}
        if name in self._small:
            return self._small[name][a:b]
        return np.asarray(st[name][a:b])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None
        state["_pid"] = None
        state["_small"] = None
        return state

    def close(self) -> None:
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None


def _targets(centroids: np.ndarray, counts: np.ndarray, diffusion: np.ndarray) -> list[dict]:
    out = []
    for c, n, d in zip(centroids, counts, diffusion):
        out.append({
            "centroids": torch.from_numpy(np.ascontiguousarray(c[:n], np.float32)),
            "n_particles": int(n),
            "diffusion": torch.from_numpy(np.ascontiguousarray(d[:n], np.float32)),
        })
    return out


class StoreDataset(Dataset):
    """One image per item: ``(image, target)``.

    ``image`` is a float32 tensor (1, H, W) of counts; ``target`` a dict with
    ``centroids`` (n, 2) in px (x, y; pixel-centre origin), ``n_particles`` and
    ``diffusion`` (n,) in um^2/s.  ``transform(image, target)`` runs on both (see
    ``loaders.augment``); ``encoder(target, (H, W))`` adds a detector's training target.

    Parameters
    ----------
    path : str or Path
        A finished store (``.h5`` or ``.zarr``).
    indices : array_like of int, optional
        The store rows served, in this order (default: every row).
    transform : callable, optional
        ``transform(image, target) -> (image, target)``, e.g. ``loaders.augment.RandomFlips``.
    encoder : callable, optional
        ``encoder(target, (H, W)) -> target``, e.g. a family's training target
        (``loaders.targets``).
    """

    def __init__(self, path: str | Path, indices=None, transform: Callable | None = None,
                 encoder: Callable | None = None):
        self.store = _LazyStore(path)
        self.indices = np.arange(self.store.length) if indices is None else np.asarray(indices)
        self.transform = transform
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        st = self.store.get()
        j = int(self.indices[i])
        image = np.asarray(st["images"][j], np.float32)
        s = self.store.small
        target = _targets(s("centroids", j, j + 1), s("n_particles", j, j + 1), s("diffusion", j, j + 1))[0]
        image = torch.from_numpy(image)[None]
        target["index"] = j
        if self.transform is not None:
            image, target = self.transform(image, target)
        if self.encoder is not None:
            target = self.encoder(target, tuple(image.shape[-2:]))
        return image, target


class StoreBatches(Dataset):
    """The fast path: one item is a whole batch read in one slice.

    Batches are contiguous, chunk-aligned runs of images (``batch_size`` is rounded up
    to a multiple of the store's chunk when ``align`` is set), so each read touches whole
    chunks once.  Use with ``DataLoader(ds, batch_size=None, shuffle=True)``: the loader
    shuffles the order of batches; ``shuffle_within`` permutes images inside a batch
    (deterministically from ``seed`` and the epoch set by ``set_epoch``).

    An item is ``(images (B, 1, H, W) float32, targets)`` where ``targets`` holds
    ``points`` (B, P, 2): the chosen ``target`` (``centroid`` or ``exposure``), NaN where
    a particle is not a detection target (``truth_points``); (B, P, 2, 2) for
    ``target="both"``, centroid then exposure along axis 2, +inf for the ``untrained``
    targets (the network's head for it does not learn from this store).  From a stack store images
    are (B, 1, Z, H, W) and ``points`` (B, P, 3) voxel coordinates (``stack_points``).
    Also ``centroids`` (B, P, 2),
    ``n_particles`` (B,), ``diffusion`` (B, P) and ``index`` (B,).

    Parameters
    ----------
    path : str or Path
        A finished store (``.h5`` or ``.zarr``) of images, movies or z-stacks.
    batch_size : int
        Images per item (the last item may hold fewer).
    align : bool
        Round ``batch_size`` up to a multiple of the store's chunk rows.
    start, stop : int
        The store rows served (default: all).
    shuffle_within : bool
        Permute the images inside each batch.
    seed : int
        Seed of those permutations.
    target : {"centroid", "exposure", "both"}
        The truth in ``points`` (``"both"``: images and movies only).
    untrained : tuple of str
        With ``target="both"``: the targets this store does not train (their points +inf).

    Raises
    ------
    ValueError
        An unknown target, a store without its array (built by an older version), or
        ``"both"`` for a stack store.
    """

    def __init__(self, path: str | Path, batch_size: int = 256, align: bool = True,
                 start: int = 0, stop: int | None = None, shuffle_within: bool = False,
                 seed: int = 0, target: str = "centroid", untrained: tuple[str, ...] = ()):
        self.store = _LazyStore(path)
        if target not in (*TARGETS, "both"):
            raise ValueError(f"target must be one of {', '.join(TARGETS)} or both, got {target!r}")
        for t in (TARGETS if target == "both" else (target,)):
            if TARGETS[t] not in self.store.names:
                raise ValueError(f"{path}: has no {TARGETS[t]} array for the {t} target "
                                 "(built by an older version: rebuild it)")
        if target == "both" and self.store.stack:
            raise ValueError(f"{path}: target both is for images and movies, not z-stacks")
        self.target = target
        # target "both": targets this store does not train (their points are +inf).
        self.untrained = tuple(untrained)
        stop = self.store.length if stop is None else min(stop, self.store.length)
        chunk = self.store.chunk
        if align:
            batch_size = int(np.ceil(batch_size / chunk) * chunk)
        self.batch_size = batch_size
        self.start, self.stop = start, stop
        self.shuffle_within = shuffle_within
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with ``seed``, draws the permutations of ``shuffle_within``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return int(np.ceil((self.stop - self.start) / self.batch_size))

    def __getitem__(self, b: int):
        if b < 0 or b >= len(self):
            raise IndexError(b)
        st = self.store.get()
        a = self.start + b * self.batch_size
        z = min(a + self.batch_size, self.stop)
        images = np.asarray(st["images"][a:z], np.float32)
        names = [n for n in ("centroids", "n_particles", "diffusion") if n in self.store.names]
        targets = {name: self.store.small(name, a, z) for name in names}
        h, w = self.store.image_shape[-2:]
        small = self.store.small
        if self.store.stack:  # (B, P, 3) voxel coordinates
            targets["points"] = stack_points(small(TARGETS[self.target], a, z), small(TARGETS_Z[self.target], a, z),
                                             small("plane_z_um", a, z), targets["n_particles"], small("in_view", a, z))
        else:
            in_view = small("in_view", a, z) if self.store.movie else None
            pts = [truth_points(small(TARGETS[t], a, z), targets["n_particles"], in_view, self.store.movie, h, w)
                   if t not in self.untrained else np.full((z - a, self.store.max_particles, 2), np.inf, np.float32)
                   for t in (TARGETS if self.target == "both" else (self.target,))]
            # Two targets: (B, P, 2, 2), [..., k, :] the k-th (centroid, exposure).
            targets["points"] = pts[0] if len(pts) == 1 else np.stack(pts, axis=2)
        targets["index"] = np.arange(a, z)
        if self.shuffle_within:
            perm = np.random.default_rng([self.seed, self.epoch, b]).permutation(z - a)
            images = images[perm]
            targets = {k: v[perm] for k, v in targets.items()}
        return torch.from_numpy(images)[:, None], {k: torch.from_numpy(v) for k, v in targets.items()}


def collate_items(batch):
    """Collate (image, target) items: stacked images, a list of targets."""
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]
