"""The networks: each overfits a small set to near-perfect localisation (targets, losses
and decoding agree), joins the shared detector contract, and the pieces are checked."""

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import dataset, run_cli
from factory.kernel import simulate
from models.base import COLUMNS
from models.densitynet import ALPHA, EPSILON, OMEGA, THETA, awing, weight_map
from models.registry import NetDetector, family

STEPS = {"spotnet": 150, "gridnet": 400, "densitynet": 200}
# deepBlink's dice loss saturates a sigmoid cell that starts wrong: its gentler rate.
LR = {"spotnet": 3e-3, "gridnet": 1e-3, "densitynet": 3e-3}
# Keypoint R-CNN: 8 images rescaled to 64 px (x 2.7) keep the run short on a CPU.
KRCNN_IMAGES, KRCNN_STEPS, KRCNN_LR = 8, 100, 1e-3
KRCNN_PARAMS = {"min_size": 64}


@pytest.fixture(scope="module")
def small_set():
    # Bright, slowly moving particles: the shape is easy, so overfitting is quick.
    cfg, ds = dataset(16, seed=3, particles={"diffusion_um2_s": 0.2, "n_qd": 40.0})
    out = simulate(ds, cfg.seed)
    return out["images"].astype(np.float32), out["centroids"]


def overfit(name, images, centroids):
    fam = family(name)
    torch.manual_seed(0)
    params = dict(fam.defaults)
    model = fam.build(**params)
    opt = torch.optim.Adam(model.parameters(), lr=LR[name], amsgrad=name == "gridnet")
    x = torch.from_numpy(images)[:, None]
    c = torch.from_numpy(centroids)
    model.train()
    for _ in range(STEPS[name]):
        value, _ = fam.loss(model, x, c)
        opt.zero_grad()
        value.backward()
        opt.step()
    return NetDetector(fam, model, min_score=0.05)


@pytest.fixture(scope="module", params=["spotnet", "gridnet", "densitynet"])
def trained(request, small_set):
    images, centroids = small_set
    return request.param, overfit(request.param, images, centroids)


def test_overfits_a_small_set_to_near_perfect_localisation(trained, small_set):
    name, det = trained
    images, centroids = small_set
    table = det.detect(images)
    top = table.sort_values("score", ascending=False).groupby("frame").head(1).set_index("frame")
    assert len(top) == len(images), f"{name}: {len(top)} of {len(images)} images detected"
    d = np.hypot(top["x"] - centroids[top.index, 0, 0], top["y"] - centroids[top.index, 0, 1])
    assert np.median(d) < 0.35 and d.max() < 1.0, (name, np.round(d.to_numpy(), 2))


def test_network_detectors_follow_the_contract(trained, small_set):
    name, det = trained
    images, _ = small_set
    table = det.detect(images[:4])
    assert list(table.columns[:4]) == COLUMNS and table["frame"].dtype == np.int64
    assert np.isfinite(table[["x", "y", "score"]].to_numpy()).all()
    # Any size: spots pasted into a larger noisy field are found at the shifted place
    # (shifts by multiples of 8 px, the networks' largest pooling stride).
    _, centroids = small_set
    big = np.random.default_rng(1).poisson(8.4, (2, 56, 72)).astype(np.float32)
    big[:, 16:40, 32:57] = images[:2]
    t_big = det.detect(big)
    for f in range(2):
        b = t_big[t_big.frame == f].sort_values("score").iloc[-1]
        err = np.hypot(b.x - 32 - centroids[f, 0, 0], b.y - 16 - centroids[f, 0, 1])
        assert err < 1.0, (name, f, err)


def test_spotnet_sigma_is_a_positive_uncertainty(trained, small_set):
    name, det = trained
    if name != "spotnet":
        pytest.skip("sigma is SpotNet's")
    table = det.detect(small_set[0])
    assert (table["sigma"] > 0).all() and table["sigma"].median() < 1.0


def test_keypoint_rcnn_overfits_a_small_set_and_answers_in_the_contract(small_set):
    """Keypoint R-CNN (torchvision, from scratch): boxes, keypoint targets and the
    pixel-corner conversion agree, so a few images are learnt to sub-pixel precision;
    the output follows the contract."""
    images, centroids = small_set[0][:KRCNN_IMAGES], small_set[1][:KRCNN_IMAGES]
    fam = family("keypointrcnn")
    torch.manual_seed(0)
    model = fam.build(**{**fam.defaults, **KRCNN_PARAMS})
    x, c = torch.from_numpy(images)[:, None], torch.from_numpy(centroids)
    opt = torch.optim.Adam(model.parameters(), lr=KRCNN_LR)
    for _ in range(KRCNN_STEPS):
        value, parts = fam.loss(model, x, c)
        assert torch.isfinite(value) and set(parts) >= {"loss_keypoint", "loss_classifier"}
        opt.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # as the trainer does
        opt.step()
    table = NetDetector(fam, model, min_score=0.0).detect(images)
    assert list(table.columns[:4]) == COLUMNS and table["frame"].dtype == np.int64
    assert table["x"].between(-0.5, 24.5).all() and table["y"].between(-0.5, 23.5).all()
    top = table.sort_values("score", ascending=False).groupby("frame").head(1).set_index("frame")
    assert len(top) == len(images)
    d = np.hypot(top["x"] - centroids[top.index, 0, 0], top["y"] - centroids[top.index, 0, 1])
    assert np.median(d) < 0.35 and d.max() < 1.0, np.round(d.to_numpy(), 2)


# --- the adaptive wing loss and the weight map ----------------------------------------------


@pytest.mark.parametrize("y", [0.0, 0.3, 0.9, 1.0])
def test_awing_is_continuous_with_matching_slope_at_theta(y):
    t = torch.tensor([y], dtype=torch.float64)
    eps = 1e-7
    below = torch.tensor([y + THETA - eps], dtype=torch.float64, requires_grad=True)
    above = torch.tensor([y + THETA + eps], dtype=torch.float64, requires_grad=True)
    lb, la = awing(below, t), awing(above, t)
    assert lb.item() == pytest.approx(la.item(), abs=1e-5)
    (gb,) = torch.autograd.grad(lb.sum(), below)
    (ga,) = torch.autograd.grad(la.sum(), above)
    assert float(gb) == pytest.approx(float(ga), rel=1e-4)
    # Hand value of the small branch at |d| = theta / 2.
    d = THETA / 2
    expected = OMEGA * np.log1p((d / EPSILON) ** (ALPHA - y))
    assert float(awing(torch.tensor([y + d], dtype=torch.float64), t)) == pytest.approx(expected)


def test_the_wrong_awing_variant_would_be_discontinuous():
    # Dividing by omega in the small branch (the known bug) leaves a jump at theta.
    y, d = 0.5, THETA
    wrong_small = OMEGA * np.log1p((d / OMEGA) ** (ALPHA - y))
    right = float(awing(torch.tensor([y + d + 1e-9], dtype=torch.float64), torch.tensor([y], dtype=torch.float64)))
    assert abs(wrong_small - right) > 0.5


def test_weight_map_is_lambda_plus_one_around_spots():
    t = torch.zeros(1, 9, 9)
    t[0, 4, 4] = 1.0
    t[0, 4, 5] = 0.5
    w = weight_map(t)
    assert w[0, 3:6, 3:7].eq(11).all()  # 3 x 3 dilation of the two hot pixels
    assert w[0, 0, 0] == 1 and w[0, 4, 7] == 1 and w.sum() == 81 + 10 * 12
    w3 = weight_map(torch.zeros(1, 5, 5, 5).index_put_((torch.tensor([0]), torch.tensor([2]), torch.tensor([2]), torch.tensor([2])), torch.tensor([1.0])))
    assert w3.eq(11).sum() == 27  # the 3D variant dilates in 3 x 3 x 3


# --- predict ----------------------------------------------------------------------------------


def test_predict_on_a_tiff_larger_than_the_training_images(tmp_path, trained, small_set):
    name, det = trained
    if name != "spotnet":
        pytest.skip("one network is enough for the CLI round trip")
    import tifffile
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": det.model.state_dict()}, run / "best.pt")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "spotnet", "model_params": family("spotnet").defaults,
                                                     "min_score": 0.05}))
    images, centroids = small_set
    stack = np.random.default_rng(2).poisson(8.4, (3, 64, 80)).astype(np.float32)
    for k in range(3):
        stack[k, 16:40, 40:65] = images[k]
    tifffile.imwrite(tmp_path / "rec.tif", stack.astype(np.uint16), photometric="minisblack")
    r = run_cli("predict", run, tmp_path / "rec.tif", "--out", tmp_path / "p.csv", "--pixel-size-um", "0.07", "-q")
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "p.csv")
    assert {"frame", "x", "y", "score", "sigma", "x_um", "y_um"} <= set(t.columns)
    for k in range(3):
        best = t[t.frame == k].sort_values("score").iloc[-1]
        assert abs(best.x - 40 - centroids[k, 0, 0]) < 1.0 and abs(best.y - 16 - centroids[k, 0, 1]) < 1.0
        assert best.x_um == pytest.approx(best.x * 0.07)
    # Bad input: one line, non-zero exit.
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    r = run_cli("predict", run, tmp_path / "bad.tif", "--out", tmp_path / "q.csv")
    assert r.returncode == 2 and "bad.tif: cannot read" in r.stderr and "Traceback" not in r.stderr
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 16, 16)))
    r = run_cli("predict", run, tmp_path / "cube.npy", "--out", tmp_path / "q.csv")
    assert r.returncode == 2 and "expected one image (H x W) or a stack" in r.stderr
    r = run_cli("predict", tmp_path / "nomodel", tmp_path / "rec.tif", "--out", tmp_path / "q.csv")
    assert r.returncode == 2 and "no such model" in r.stderr
