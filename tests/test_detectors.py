"""One contract, one suite: every registered detector (TrackPy and each network family,
the networks overfitted on a small set) is run through the same checks."""

import types
from typing import Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
import pandas as pd
import pytest

from conftest import ready_detector, small_training_set
from models.detectors.base import COLUMNS, Detector
from models.detectors.registry import DETECTORS_2D, FAMILIES, make_detector
from models.detectors.trackpy import Params, TrackPyDetector

DETECTORS = list(DETECTORS_2D)


@pytest.fixture(scope="module")
def images():
    return small_training_set()


@pytest.mark.parametrize("name", DETECTORS)
def test_contract_columns_and_types(name, images):
    table = ready_detector(name).detect(images[0])
    assert list(table.columns[:4]) == COLUMNS
    assert table["frame"].dtype == np.int64
    assert table["frame"].between(0, len(images[0]) - 1).all()
    assert np.isfinite(table[["x", "y", "score"]].to_numpy()).all()


@pytest.mark.parametrize("name", DETECTORS)
def test_contract_finds_bright_spots_in_pixel_centre_coordinates(name, images):
    imgs, centroids = images
    table = ready_detector(name).detect(imgs)
    best = table.sort_values("score", ascending=False).groupby("frame").head(1).set_index("frame")
    d = np.hypot(best["x"] - centroids[best.index, 0, 0], best["y"] - centroids[best.index, 0, 1])
    assert len(best) >= 0.9 * len(imgs) and np.median(d) < 1.0, (name, len(best), np.median(d))


@pytest.mark.parametrize("name", DETECTORS)
def test_contract_a_min_score_leaves_out_only_rows_below_it(name, images):
    """detect(min_score=c) keeps, to the bit, every row of detect() scored from c on, and
    leaves out rows below it (a detector that ignored the cut would not)."""
    det = ready_detector(name)
    full = det.detect(images[0])
    c = float(np.median(full["score"]))
    cut = det.detect(images[0], min_score=c)
    above = lambda t: t[t["score"] >= c].reset_index(drop=True)  # noqa: E731
    assert len(above(full)) and len(cut) < len(full), (name, len(cut), len(full))
    pd.testing.assert_frame_equal(above(cut), above(full), check_exact=True)


@pytest.mark.parametrize("name", DETECTORS)
def test_contract_any_image_size_finds_the_spot_where_it_was_pasted(name, images):
    """Spots pasted into a larger noisy field are found at the shifted place (shifts by
    multiples of 8 px, the networks' largest pooling stride); a detector that ignored the
    image, or mixed up x and y, fails."""
    imgs, centroids = images
    det = ready_detector(name)
    big = np.random.default_rng(1).poisson(8.4, (3, 40, 64)).astype(np.float32)
    offsets = [(8, 16), (32, 8), (16, 0)]  # (x, y) of the pasted image's corner
    for k, (ox, oy) in enumerate(offsets):
        big[k, oy:oy + 24, ox:ox + 25] = imgs[k]
    table = det.detect(big)
    for k, (ox, oy) in enumerate(offsets):
        sel = table[table.frame == k]
        assert len(sel), (name, k)
        b = sel.sort_values("score").iloc[-1]
        err = np.hypot(b.x - ox - centroids[k, 0, 0], b.y - oy - centroids[k, 0, 1])
        assert err < 1.5, (name, k, err)


def test_keypointrcnn_zooms_every_image_size_by_one_factor():
    """torchvision zooms each image to a short side of ``min_size``: a 40 x 64 field by x 1.6
    against x 2.7 for a 24 x 25 image, so the overfitted model missed spots pasted into the
    field.  Every size now gets ``min_size / 24``; a 24 px image as torchvision zooms it."""
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from models.networks.keypoint_rcnn import SmallKeypointRCNN

    t = SmallKeypointRCNN(min_size=64, keypoint_head=[4], box_head=8).net.transform.eval()
    stock = GeneralizedRCNNTransform(t.min_size, t.max_size, t.image_mean, t.image_std).eval()
    small, field = torch.rand(3, 24, 25), torch.rand(3, 40, 64)
    assert t.resize(small)[0].shape[-2:] == (64, 66)
    assert torch.equal(t.resize(small)[0], stock.resize(small)[0])
    assert t.resize(field)[0].shape[-2:] == (106, 170)  # torchvision: (64, 102)
    t.train()
    target = {"boxes": torch.tensor([[10.0, 20.0, 16.0, 26.0]]), "keypoints": torch.tensor([[[13.0, 23.0, 1.0]]])}
    _, out = t.resize(field, {k: v.clone() for k, v in target.items()})
    assert torch.allclose(out["keypoints"][0, 0, :2], torch.tensor([13.0 * 170 / 64, 23.0 * 106 / 40]))


@pytest.mark.parametrize("name", DETECTORS)
def test_contract_2d_input_is_one_frame(name, images):
    table = ready_detector(name).detect(images[0][0])
    assert len(table) and set(table.frame) == {0}


def _conforms(value, hint) -> bool:
    """``value`` has the type ``hint`` names: one of a Literal's values (of its type), any
    member of a union, an int or float for ``float`` (never a bool)."""
    if get_origin(hint) is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(hint))
    if get_origin(hint) in (Union, types.UnionType):
        return any(_conforms(value, a) for a in get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


# Every detector class, built as cheaply as it comes (networks untrained): each registered
# family, TrackPy 3D, and a network on the exposure target (its own time stamps).
KNOWN = [*FAMILIES, "trackpy3d", "spotnet-exposure"]


def _build(name: str):
    if name == "trackpy3d":
        return TrackPyDetector(Params(diameter=9, diameter_z=5))
    if name == "spotnet-exposure":
        return make_detector("spotnet", target="exposure")
    return make_detector(name)


@pytest.mark.parametrize("name", KNOWN)
def test_every_detector_meets_the_protocol_with_typed_values(name):
    """Callers read the protocol's attributes as they are (no defaults): each detector has
    every one, of the annotated type and allowed value, and the values the callers
    assumed before the protocol named them."""
    det = _build(name)
    assert isinstance(det, Detector), name
    for attr, hint in get_type_hints(Detector).items():
        value = getattr(det, attr)
        assert _conforms(value, hint), (name, attr, value, hint)
    network = name not in ("trackpy", "trackpy3d")
    assert det.name == name.removesuffix("-exposure").removesuffix("3d" if name == "trackpy3d" else "")
    assert det.label and det.label != det.name
    assert det.ndim == (3 if name in ("trackpy3d", "dmdetnet3d") else 2)
    assert det.target == ("exposure" if name == "spotnet-exposure" else "centroid")
    # A network's centroid is the whole frame's; everything else is where the laser saw it.
    assert det.timestamps == ("frame" if network and det.target == "centroid" else "scan")
    assert det.threshold is None and det.z_step_um is None  # untuned, untrained
    step = det.batch_frames(24, 25)
    assert type(step) is int and (step > 1 if network else step == 1), (name, step)


@pytest.mark.parametrize("ndim", [2, 3])
def test_trackpy_in_worker_processes_finds_what_locate_finds_image_by_image(ndim):
    """Enough images to start TrackPy's worker processes, in more than one call of them:
    the table is `trackpy.locate` on each image in turn, in this process (the detector
    takes images as float32, and stacks as float64)."""
    import trackpy

    from models.detectors import trackpy as tp

    rng = np.random.default_rng(11)
    n = 2 * tp.PARALLEL_IMAGES + 7
    shape = (n, 24, 24) if ndim == 2 else (n, 7, 20, 20)
    images = rng.poisson(3.0, shape).astype(np.uint16)
    for i in range(n):  # one bright spot each, somewhere inside
        c = tuple(rng.integers(s // 4, s - s // 4) for s in shape[1:])
        images[(i, *c)] += 60
    params = Params(diameter=5) if ndim == 2 else Params(diameter=5, diameter_z=3)
    det = TrackPyDetector(params)
    chunk = tp.CHUNK_IMAGES
    tp.CHUNK_IMAGES = n // 2  # two calls of the workers (each over PARALLEL_IMAGES): frames counted on from the first
    try:
        table = det.detect(images)
    finally:
        tp.CHUNK_IMAGES = chunk
    axes = ["x", "y", "z"][:ndim]
    diameter = 5 if ndim == 2 else (3, 5, 5)
    rows = []
    for i in range(n):
        image = images[i].astype(np.float32 if ndim == 2 else np.float64)
        f = trackpy.locate(image, diameter, percentile=64.0, preprocess=True)
        rows += [(i, *r) for r in f[axes + ["mass"]].to_numpy()]
    want = np.array(rows)
    assert len(table) == len(want) >= n
    np.testing.assert_array_equal(table[["frame", *axes, "score"]].to_numpy(), want)
