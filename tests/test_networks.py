"""The networks: each overfits a small set to near-perfect localisation (targets, losses
and decoding agree), joins the shared detector contract, and the pieces are checked."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import one_line_error, overfit, overfit_run, run_cli, small_training_set
from models.networks.densitynet import ALPHA, EPSILON, OMEGA, THETA, awing, weight_map


@pytest.fixture(scope="module")
def small_set():
    return small_training_set()


@pytest.fixture(scope="module", params=["spotnet", "gridnet", "densitynet", "keypointrcnn"])
def trained(request):
    return request.param, overfit(request.param)


def test_overfits_a_small_set_to_near_perfect_localisation(trained, small_set):
    """Targets, losses and decoding agree: a few images are learnt to sub-pixel precision
    (Keypoint R-CNN also checks torchvision's pixel-corner conversion)."""
    name, det = trained
    images, centroids = small_set
    n = 8 if name == "keypointrcnn" else len(images)
    table = det.detect(images[:n])
    top = table.sort_values("score", ascending=False).groupby("frame").head(1).set_index("frame")
    assert len(top) == n, f"{name}: {len(top)} of {n} images detected"
    d = np.hypot(top["x"] - centroids[top.index, 0, 0], top["y"] - centroids[top.index, 0, 1])
    assert np.median(d) < 0.35 and d.max() < 1.0, (name, np.round(d.to_numpy(), 2))


def test_spotnet_sigma_is_a_positive_uncertainty(small_set):
    table = overfit("spotnet").detect(small_set[0])
    assert (table["sigma"] > 0).all() and table["sigma"].median() < 1.0


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
    hot = torch.zeros(1, 5, 5, 5)
    hot[0, 2, 2, 2] = 1.0
    w3 = weight_map(hot)
    assert w3.eq(11).sum() == 27  # the 3D variant dilates in 3 x 3 x 3


# --- predict ----------------------------------------------------------------------------------


def test_predict_on_a_tiff_larger_than_the_training_images(tmp_path, small_set):
    import tifffile

    run = overfit_run(tmp_path / "run")
    images, centroids = small_set
    stack = np.random.default_rng(2).poisson(8.4, (3, 64, 80)).astype(np.float32)
    for k in range(3):
        stack[k, 16:40, 40:65] = images[k]
    tifffile.imwrite(tmp_path / "rec.tif", stack.astype(np.uint16), photometric="minisblack")
    r = run_cli("predict", run.path, tmp_path / "rec.tif", "--out", tmp_path / "p.csv", "--pixel-size-um", "0.07", "-q")
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "p.csv")
    assert {"frame", "x", "y", "score", "sigma", "x_um", "y_um"} <= set(t.columns)
    for k in range(3):
        best = t[t.frame == k].sort_values("score").iloc[-1]
        assert abs(best.x - 40 - centroids[k, 0, 0]) < 1.0 and abs(best.y - 16 - centroids[k, 0, 1]) < 1.0
        assert best.x_um == pytest.approx(best.x * 0.07)
    # Bad input: one line, non-zero exit.
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    one_line_error(run_cli("predict", run.path, tmp_path / "bad.tif", "--out", tmp_path / "q.csv"), "bad.tif: cannot read")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 16, 16)))
    one_line_error(run_cli("predict", run.path, tmp_path / "cube.npy", "--out", tmp_path / "q.csv"),
                   "expected one image (H x W) or a stack")
    one_line_error(run_cli("predict", tmp_path / "nomodel", tmp_path / "rec.tif", "--out", tmp_path / "q.csv"),
                   "no such model")
    assert not (tmp_path / "q.csv").exists()


def test_a_two_headed_spotnet_trains_each_head_on_its_own_target_only():
    """Head 0 (centroid) and head 1 (exposure) share the backbone; an image whose
    points of a head are +inf (its target not observable there) gives that head no
    gradient, and the flips of test-time averaging map both heads' offsets back."""
    from models.networks import spotnet

    torch.manual_seed(0)
    model = spotnet.build(spotnet.Params(widths=[4, 8], heads=2, flip_tta=False))
    images = torch.rand(2, 1, 16, 16) * 10
    pts = torch.full((2, 1, 2, 2), float("nan"))
    pts[:, 0, 1] = torch.tensor([5.0, 6.0])
    pts[:, :, 0] = float("inf")
    value, parts = spotnet.loss(model, images, pts)
    value.backward()
    assert set(parts) == {"focal1", "l11", "nll1"}
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.head.parameters())
    assert all(float(p.grad.abs().sum()) > 0 for p in model.extra_heads[0].parameters())
    out = model(images)
    assert out.shape == (2, 8, 16, 16)
    model.eval()
    with torch.no_grad():
        flipped = spotnet.forward_flips(model, images)
        # By hand: each flipped pass mapped back, a mirrored x negating both heads' dx
        # (channels 1 and 5), a mirrored y both dy (2 and 6).
        passes = []
        for dims in ((), (-1,), (-2,), (-1, -2)):
            o = model(images.flip(dims) if dims else images)
            o = o.flip(dims) if dims else o
            sign = torch.ones(8)
            if -1 in dims:
                sign[[1, 5]] = -1
            if -2 in dims:
                sign[[2, 6]] = -1
            passes.append(o * sign[None, :, None, None])
    torch.testing.assert_close(flipped, torch.stack(passes).mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("branch, branch_stride", [("head", 1), ("decoder", 1), ("decoder", 2)])
def test_head_parameters_are_exactly_what_a_heads_output_depends_on(branch, branch_stride):
    """head_parameters(k) (which the trainer uses to validate a frozen head once) is the
    set of parameters with a gradient from head k's output; running head k alone gives
    head k's channels of the full forward pass."""
    from models.networks import spotnet

    torch.manual_seed(0)
    model = spotnet.build(spotnet.Params(widths=[4, 8, 16], heads=2, flip_tta=False, branch=branch,
                                         branch_stride=branch_stride))
    images = torch.rand(2, 1, 16, 16) * 10
    full = model(images)
    for k in range(2):
        model.zero_grad(set_to_none=True)
        out = model(images, k)
        torch.testing.assert_close(out, full[:, 4 * k:4 * k + 4])
        out.square().sum().backward()
        with_grad = {id(p) for p in model.parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
        assert with_grad == {id(p) for p in model.head_parameters(k)}


def test_a_half_resolution_head_gives_the_2x2_pixels_each_of_its_pixels_covers():
    # branch_stride 2: the exposure head runs on half-resolution features and its 16
    # outputs per pixel are, in the pixel shuffle's order, channel c of full-resolution
    # pixel (2i + di, 2j + dj) at index 4c + 2di + dj.  Hand-set last layer: each output
    # a constant that names its channel and place; the heat logits start at the prior.
    from models.networks import spotnet

    model = spotnet.build(spotnet.Params(widths=[4, 8, 16], heads=2, flip_tta=False, branch="decoder",
                                         branch_stride=2)).eval()
    last = model.extra_heads[0][2]
    prior = -math.log(0.99 / 0.01)
    assert last.out_channels == 16 and torch.allclose(last.bias[:4], torch.full((4,), prior))
    assert not last.bias[4:].any()
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.arange(16.0))
        out = model(torch.rand(1, 1, 13, 10) * 10, 1)  # odd sizes: padded, then cropped
    assert out.shape == (1, 4, 13, 10)
    for c in range(4):
        for di in range(2):
            for dj in range(2):
                assert (out[0, c, di::2, dj::2] == 4 * c + 2 * di + dj).all()
    # The centroid head keeps full resolution; a half-resolution one needs its own decoder.
    assert model.head[2].out_channels == 4
    # Started from a one-headed model (init_from): its decoder's levels are copies of the
    # first decoder's, the coarsest first, and the head (of another shape) is left as it is.
    model.copy_first_head()
    (mine,), first = model.extra_decoders[0], model.unet.up
    assert len(first) == 2
    for k, v in first[0].state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k
    assert (model.extra_heads[0][2].bias == torch.arange(16.0)).all()
    from factory.errors import ConfigError
    from models.detectors.registry import parse_params

    with pytest.raises(ConfigError, match=r"^cfg\.yaml: model_params: branch_stride 2 needs branch: decoder[^,]*$"):
        parse_params("spotnet", {"branch_stride": 2}, "cfg.yaml")


def dense_decode(out: torch.Tensor, min_score: float):
    """SpotNet's decoding written over the whole map with pooling: peaks are the pixels
    equal to their 3 x 3 maximum, positions the probability-weighted 5 x 5 mean of
    pixel + offset (average pooling over the pixels inside the image)."""
    p = torch.sigmoid(out[:, 0]).double()
    peak = (p == F.max_pool2d(p[:, None], 3, 1, 1)[:, 0]) & (p >= min_score)
    h, w = p.shape[-2:]
    ex = torch.arange(w, dtype=p.dtype).view(1, 1, w) + out[:, 1].double()
    ey = torch.arange(h, dtype=p.dtype).view(1, h, 1) + out[:, 2].double()
    pool = lambda t: F.avg_pool2d(t[:, None], 5, 1, 2, count_include_pad=False)[:, 0]  # noqa: E731
    mx, my = pool(p * ex) / pool(p), pool(p * ey) / pool(p)
    return [(torch.stack([mx[i][peak[i]], my[i][peak[i]]], 1).numpy(), p[i][peak[i]].numpy()) for i in range(len(p))]


def test_a_large_field_keeps_every_peak_and_a_set_cap_keeps_the_most_probable():
    """1,000 spots in a 1024 x 1024 px map (one per 32 x 32 px): all come back, at the
    pixel of their peak; a fixed cap of 256 would have kept a quarter.  A cap given keeps
    the most probable, in row-major order."""
    from models.networks.spotnet import MAX_PEAKS, decode

    out = torch.full((1, 4, 1024, 1024), -12.0)
    out[:, 1:] = 0.0
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(25) * 40 + 20, torch.arange(40) * 25 + 12, indexing="ij")
    logits = torch.rand(1000, generator=g) * 4
    out[0, 0, rows.reshape(-1), cols.reshape(-1)] = logits
    assert 1000 > MAX_PEAKS
    (xy, score, _), = decode(out, 0.01)
    assert len(xy) == 1000
    assert {(int(x), int(y)) for x, y in np.round(xy)} == set(zip(cols.reshape(-1).tolist(), rows.reshape(-1).tolist()))
    (xy, score, _), = decode(out, 0.01, max_per_image=100)
    top = torch.argsort(-logits)[:100].sort().values  # row-major order of the grid
    assert np.array_equal(np.round(xy), torch.stack([cols.reshape(-1)[top], rows.reshape(-1)[top]], 1).numpy())


@pytest.mark.parametrize("shape", [(3, 40, 37), (2, 5, 6)])
def test_the_decoding_is_the_pooled_one_on_maps_with_plateaus_and_edges(shape):
    """Peaks at the image's edges and in corners, flat plateaus (ties are all peaks), and
    the min_score cut: the same peaks and positions as pooling the whole map in float64."""
    from models.networks.spotnet import decode

    g = torch.Generator().manual_seed(0)
    out = torch.randn(shape[0], 4, *shape[1:], generator=g) * 3
    out[0, 0, :2, :2] = 5.0  # a plateau in a corner
    out[0, 0, -1, 10 % shape[2]] = 8.0  # a peak on the last row
    for min_score in (0.0, 0.2, 0.9):
        ours, ref = decode(out, min_score, max_per_image=10**6), dense_decode(out, min_score)
        for (xy, score, sigma), (xy_ref, p_ref) in zip(ours, ref):
            assert len(xy) == len(xy_ref)
            np.testing.assert_allclose(xy, xy_ref, atol=2e-5)
            # score = p (1 - exp(-1 / (2 sigma^2))) with the sigma it reports
            np.testing.assert_allclose(score, p_ref * (1 - np.exp(-1 / (2 * sigma**2))), rtol=1e-4)  # float32
    assert all(len(r[0]) for r in decode(out, 0.0)) and sum(map(len, ref)) < sum(len(r[0]) for r in decode(out, 0.0))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_one_channel_1x1_convolution_is_the_convolution_to_the_bit(memory_format):
    """Conv1x1 computes a one-channel input as a product per channel: its output and
    both gradients are nn.Conv2d's own bits, and a SpotNet trains to the same weights."""
    import copy

    from torch import nn

    from models.networks.blocks import Conv1x1
    from models.networks.spotnet import SpotNet, loss

    torch.manual_seed(0)
    conv = Conv1x1(1, 8).to(memory_format=memory_format)
    x = torch.randn(3, 1, 17, 13).contiguous(memory_format=memory_format).requires_grad_()
    grad = torch.randn(3, 8, 17, 13).contiguous(memory_format=memory_format)
    results = []
    for forward in (conv.forward, lambda t: nn.Conv2d.forward(conv, t)):
        x.grad = conv.weight.grad = None
        y = forward(x)
        y.backward(grad)
        results.append((y.detach(), x.grad, conv.weight.grad))
    for ours, plain in zip(*results):
        assert torch.equal(ours, plain)

    # Whole training steps (the stem's skip is a Conv1x1 from the image's one channel).
    model = SpotNet((8, 16), heads=2, branch="decoder").train()
    assert isinstance(model.unet.stem.skip, Conv1x1) and model.unet.stem.skip.in_channels == 1
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, Conv1x1):
            m.forward = (lambda mod: lambda t: nn.Conv2d.forward(mod, t))(m)
    images, points = torch.rand(8, 1, 32, 32) * 100, torch.rand(8, 3, 2, 2) * 30
    for net in (model, plain):
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        for _ in range(3):
            opt.zero_grad()
            loss(net, images, points)[0].backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_standardisation_takes_pixels_of_any_scale_alike_and_keeps_counts_as_trained():
    # Photon counts (a spread of a count or more) standardise exactly as every model was
    # trained (the spread plus 1e-3); the same frames scaled to 0 - 1, as some software
    # exports them, give the same input within 1e-3 of its scale (before, the 1e-3 swamped
    # their spread of about 1e-4 and the network saw nearly flat images); a flat image gives zeros.
    from models.networks.blocks import normalize_images

    counts = torch.from_numpy(np.random.default_rng(0).poisson(8.4, (3, 1, 24, 25)).astype(np.float32))
    mean = counts.mean(dim=(-2, -1), keepdim=True)
    std = counts.std(dim=(-2, -1), keepdim=True)
    assert torch.equal(normalize_images(counts), (counts - mean) / (std + 1e-3))
    scaled = normalize_images(counts / 65535)
    assert torch.allclose(scaled, normalize_images(counts), atol=1e-2)
    assert scaled.std().item() == pytest.approx(1.0, rel=2e-3)
    assert torch.equal(normalize_images(torch.full((1, 1, 8, 8), 0.25)), torch.zeros(1, 1, 8, 8))

