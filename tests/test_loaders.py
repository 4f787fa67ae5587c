"""Loaders over real stores, with worker processes started by fork and by spawn."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from factory.build import build
from factory.config import parse_config
from factory.stores import Store
from loaders.augment import RandomFlips, flip_batch, hflip, vflip
from loaders.datasets import StoreBatches, StoreDataset, collate_items
from loaders.targets import (centre_to_corner, corner_to_centre, density_decode, density_target,
                             grid_decode, grid_target, keypoint_decode, keypoint_target)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    cfg = parse_config({"seed": 5, "defaults": {"output": {"chunk_images": 64}}, "datasets": {
        "s": {"n_images": 300, "particles": {"count": {"type": "poisson", "mean": 1.5, "max": 3}}}}})
    build(cfg, root, "hdf5", progress=False)
    build(cfg, root, "zarr", progress=False)
    return {"hdf5": root / "s.h5", "zarr": root / "s.zarr"}


def direct(path):
    with Store(path) as st:
        return st.read("images"), st.read("centroids"), st.read("n_particles")


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_items_with_two_workers_equal_a_direct_read(stores, fmt, method):
    images, cen, cnt = direct(stores[fmt])
    ds = StoreDataset(stores[fmt])
    dl = DataLoader(ds, batch_size=32, num_workers=2, multiprocessing_context=method,
                    collate_fn=collate_items, shuffle=False)
    seen = 0
    for batch_images, targets in dl:
        for img, t in zip(batch_images, targets):
            j = t["index"]
            assert torch.equal(img[0], torch.from_numpy(images[j].astype(np.float32)))
            n = cnt[j]
            assert t["n_particles"] == n
            assert torch.equal(t["centroids"], torch.from_numpy(cen[j, :n]))
            seen += 1
    assert seen == len(images)


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_chunk_batches_with_two_workers_equal_a_direct_read(stores, fmt, method):
    images, cen, cnt = direct(stores[fmt])
    ds = StoreBatches(stores[fmt], batch_size=100)
    assert ds.batch_size == 128 and len(ds) == 3  # rounded up to whole 64-image chunks
    dl = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=method, shuffle=True)
    got = np.zeros(len(images), bool)
    for imgs, t in dl:
        idx = t["index"].numpy()
        assert np.array_equal(imgs[:, 0].numpy(), images[idx].astype(np.float32))
        assert np.array_equal(t["centroids"].numpy(), cen[idx], equal_nan=True)
        assert np.array_equal(t["n_particles"].numpy(), cnt[idx])
        got[idx] = True
    assert got.all()


def test_shuffle_within_batches_is_deterministic(stores):
    a = StoreBatches(stores["hdf5"], 128, shuffle_within=True, seed=1)
    b = StoreBatches(stores["hdf5"], 128, shuffle_within=True, seed=1)
    assert torch.equal(a[1][1]["index"], b[1][1]["index"])
    a.set_epoch(1)
    assert not torch.equal(a[1][1]["index"], b[1][1]["index"])
    assert sorted(a[1][1]["index"].tolist()) == list(range(128, 256))


# --- targets: points -> target -> points ---------------------------------------------------

RNG = np.random.default_rng(0)


def separated_points(n, h, w, min_dist, margin=0.0):
    pts = []
    while len(pts) < n:
        p = RNG.uniform([margin, margin], [w - 1 - margin, h - 1 - margin])
        if all(np.hypot(*(p - q)) >= min_dist for q in pts):
            pts.append(p)
    return np.array(pts)


def test_pixel_centre_corner_round_trip_and_convention():
    p = RNG.uniform(0, 20, (10, 2))
    np.testing.assert_allclose(corner_to_centre(centre_to_corner(p)), p)
    # The centre of pixel (0, 0) is (0, 0) in the stores and (0.5, 0.5) for torchvision.
    np.testing.assert_allclose(centre_to_corner(np.zeros(2)), [0.5, 0.5])


def test_keypoint_target_round_trip():
    p = separated_points(5, 24, 25, 3)
    t = keypoint_target(p)
    assert t["boxes"].shape == (5, 4) and t["keypoints"].shape == (5, 1, 3)
    # The box is centred on the keypoint, in torchvision's corner convention.
    centre = (t["boxes"][:, :2] + t["boxes"][:, 2:]) / 2
    assert torch.allclose(centre, t["keypoints"][:, 0, :2])
    assert torch.allclose(t["keypoints"][:, 0, :2], torch.tensor(p, dtype=torch.float32) + 0.5)
    back, _ = keypoint_decode({"keypoints": t["keypoints"], "scores": torch.ones(5)})
    np.testing.assert_allclose(back, p, atol=1e-5)


def test_grid_target_round_trip():
    p = separated_points(12, 48, 50, 6)
    g = grid_target(p, 48, 50)
    assert g.shape == (3, 12, 13) and g[0].sum() == 12
    back, prob = grid_decode(g)
    order = lambda a: a[np.lexsort((a[:, 1], a[:, 0]))]
    np.testing.assert_allclose(order(back), order(p), atol=1e-5)


def test_density_target_round_trip():
    p = separated_points(8, 40, 45, 5, margin=1.0)
    d = density_target(p, 40, 45)
    assert d.max() <= 1.0 and d.min() >= 0.0
    back, peak = density_decode(d, threshold=0.3)
    order = lambda a: a[np.lexsort((a[:, 1], a[:, 0]))]
    assert len(back) == 8
    np.testing.assert_allclose(order(back), order(p), atol=1e-4)


# --- augmentations -------------------------------------------------------------------------


def test_flips_move_coordinates_with_the_pixels():
    img = torch.zeros(1, 24, 25)
    img[0, 7, 3] = 1.0  # row 7, column 3: (x, y) = (3, 7)
    pts = torch.tensor([[3.0, 7.0]])
    fi, fp = hflip(img, pts)
    assert fi[0, 7, 21] == 1 and torch.equal(fp, torch.tensor([[21.0, 7.0]]))
    fi, fp = vflip(img, pts)
    assert fi[0, 16, 3] == 1 and torch.equal(fp, torch.tensor([[3.0, 16.0]]))
    b, c = flip_batch(img[None].repeat(8, 1, 1, 1), pts[None].repeat(8, 1, 1), torch.Generator().manual_seed(0))
    for i in range(8):
        y, x = np.unravel_index(int(b[i, 0].argmax()), (24, 25))
        assert (x, y) == tuple(c[i, 0].int().tolist())


def test_flips_move_every_target_and_stack_points_with_the_pixels():
    """Two targets per particle (B, P, 2, 2) and stack voxels (B, P, 3): x and y mirror
    with the image, z stays."""
    img = torch.zeros(8, 1, 24, 25)
    img[:, 0, 7, 3] = 1.0
    two = torch.tensor([[3.0, 7.0], [4.0, 9.0]]).expand(8, 1, 2, 2)
    b, c = flip_batch(img, two, torch.Generator().manual_seed(0))
    for i in range(8):
        y, x = np.unravel_index(int(b[i, 0].argmax()), (24, 25))
        assert (x, y) == tuple(c[i, 0, 0].int().tolist())
        hx, hy = x != 3, y != 7
        assert tuple(c[i, 0, 1].tolist()) == (24 - 4.0 if hx else 4.0, 23 - 9.0 if hy else 9.0)
    stack = torch.zeros(8, 1, 5, 24, 25)
    stack[:, 0, 2, 7, 3] = 1.0
    vox = torch.tensor([[3.0, 7.0, 2.0]]).expand(8, 1, 3)
    b, c = flip_batch(stack, vox, torch.Generator().manual_seed(0))
    for i in range(8):
        z, y, x = np.unravel_index(int(b[i, 0].argmax()), (5, 24, 25))
        assert (x, y, z) == tuple(c[i, 0].int().tolist())


def test_scan_axis_swaps_are_refused():
    with pytest.raises(ValueError, match="swaps the fast and slow scan axes"):
        RandomFlips(ops=("hflip", "rot90"))
    with pytest.raises(ValueError, match="not allowed"):
        RandomFlips(ops=("transpose",))
