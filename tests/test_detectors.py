"""One contract, one suite: every registered detector is run through the same checks."""

import numpy as np
import pandas as pd
import pytest

from factory.kernel import simulate
from conftest import dataset
from models.base import COLUMNS, REGISTRY
import models.trackpy_detector  # noqa: F401  (registers trackpy)

DETECTORS = sorted(REGISTRY)


@pytest.fixture(scope="module")
def images():
    cfg, ds = dataset(24, particles={"diffusion_um2_s": 0.3, "n_qd": 40.0})
    out = simulate(ds, cfg.seed)
    return out["images"], out["centroids"][:, 0]


@pytest.mark.parametrize("name", DETECTORS)
def test_contract_columns_and_types(name, images):
    det = REGISTRY[name]()
    table = det.detect(images[0])
    assert list(table.columns[:4]) == COLUMNS
    assert table["frame"].dtype == np.int64
    assert table["frame"].between(0, len(images[0]) - 1).all()
    assert np.isfinite(table[["x", "y", "score"]].to_numpy()).all()


@pytest.mark.parametrize("name", DETECTORS)
def test_contract_finds_bright_spots_in_pixel_centre_coordinates(name, images):
    imgs, truth = images
    table = REGISTRY[name]().detect(imgs)
    best = table.sort_values("score", ascending=False).groupby("frame").head(1).set_index("frame")
    d = np.hypot(best["x"] - truth[best.index, 0], best["y"] - truth[best.index, 1])
    assert len(best) >= 0.9 * len(imgs) and np.median(d) < 1.0


@pytest.mark.parametrize("name", DETECTORS)
def test_contract_any_image_size_and_2d_input(name, images):
    det = REGISTRY[name]()
    big = np.full((2, 40, 60), 8.0, np.float32)
    big[:, 10:34, 20:45] = images[0][:2]
    table = det.detect(big)
    assert table["x"].max() < 60 and table["y"].max() < 40
    assert set(det.detect(images[0][0]).frame) <= {0}
