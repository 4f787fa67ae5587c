"""One contract, one suite: every registered detector (TrackPy and each network family,
the networks overfitted on a small set) is run through the same checks."""

import numpy as np
import pytest

from conftest import ready_detector, small_training_set
from models.base import COLUMNS
from models.registry import DETECTORS_2D

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


@pytest.mark.parametrize("name", DETECTORS)
def test_contract_2d_input_is_one_frame(name, images):
    table = ready_detector(name).detect(images[0][0])
    assert len(table) and set(table.frame) == {0}
