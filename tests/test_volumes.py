"""z-stacks in the detectors: the 3D density-map network, TrackPy 3D, 3D metrics, and
the CLI on stacks, on stacks simulated here."""

import json

import numpy as np
import pytest
import torch
import yaml
from pandas.testing import assert_frame_equal

from conftest import dataset, one_line_error, run_cli
from factory.kernel import simulate
from models.evaluation.metrics import Points, evaluate_points
from models.networks import dmdetnet3d as net
from models.detectors.registry import NetDetector, family
from models.detectors.trackpy import Params, TrackPyDetector

PX, DZ = 0.07, 0.5


def stacks(n, planes=10, size=24, seed=5, **particles):
    p = {"diffusion_um2_s": 0.0, "n_qd": 40.0, "count": 1, "xy_start": {"margin_px": 5},
         "z_start_um": {"low": -1.5, "high": 1.5}, **particles}
    cfg, ds = dataset(None, seed=seed, n_stacks=n, stack={"n_planes": planes, "z_step_um": DZ},
                      image={"height_px": size, "width_px": size}, particles=p)
    out = simulate(ds, cfg.seed)
    first = out["plane_z_um"][:, :1].astype(np.float64)
    truth = np.concatenate([out["centroids"], ((out["centroid_z_um"] - first) / DZ)[..., None]], -1)
    return out["images"].astype(np.float32), truth  # voxels: x px, y px, z planes


def test_points_to_3d_density_to_points_is_exact_for_anisotropic_gaussians():
    pts = torch.tensor([[[5.3, 7.8, 2.4], [15.6, 4.2, 6.7], [np.nan, np.nan, np.nan]]])
    d = net.density_target_3d(pts, (10, 20, 24), (0.7, 1.0, 1.0))
    (xyz, score, _), = net.decode(d[:, None].squeeze(1), 0.3)
    order = np.argsort(xyz[:, 0])
    np.testing.assert_allclose(xyz[order], pts[0, :2].numpy(), atol=1e-4)
    # The score is the density at the peak voxel, by hand: the nearest voxel's Gaussian.
    near = np.round(pts[0, :2].numpy())
    off = pts[0, :2].numpy() - near
    hand = np.exp(-off[:, 0] ** 2 / 2 - off[:, 1] ** 2 / 2 - off[:, 2] ** 2 / (2 * 0.7**2))
    np.testing.assert_allclose(score[order], hand, rtol=1e-5)


def test_a_large_stack_keeps_every_peak_and_a_set_cap_keeps_the_most_probable():
    """600 isolated peaks in a 4 x 512 x 512 stack (planes 0 and 2): all come back, at
    their voxels (a cap of 512 would have dropped some); a cap given keeps the most probable."""
    d = torch.zeros(1, 4, 512, 512)
    z, y, x = torch.meshgrid(torch.tensor([0, 2]), torch.arange(15) * 32 + 16, torch.arange(20) * 25 + 12, indexing="ij")
    z, y, x = z.reshape(-1), y.reshape(-1), x.reshape(-1)
    level = 0.1 + 0.8 * torch.rand(len(z), generator=torch.Generator().manual_seed(2))
    d[0, z, y, x] = level
    assert len(z) > net.MAX_PEAKS
    (xyz, score, _), = net.decode(d, 0.05)
    assert len(xyz) == len(z)
    assert {tuple(v) for v in np.round(xyz).astype(int)} == set(zip(x.tolist(), y.tolist(), z.tolist()))
    (xyz, score, _), = net.decode(d, 0.05, max_per_stack=100)
    np.testing.assert_array_equal(np.sort(score), np.sort(level.double().numpy())[-100:])


def test_3d_weight_map_and_awing_hold_on_stacks():
    t = net.density_target_3d(torch.tensor([[[6.0, 6.0, 3.0]]]), (7, 12, 12), (0.7, 1.0, 1.0))
    w = net.weight_map(t)
    assert w.shape == t.shape and w[0, 3, 6, 6] == 11 and w[0, 0, 0, 0] == 1
    # AWing: zero loss at the target, continuous at theta.
    y = torch.full((3,), 0.3)
    eps = 1e-6
    a = net.awing(y + torch.tensor([0.0, 0.5 - eps, 0.5 + eps]), y)
    assert a[0] == 0 and abs(a[1] - a[2]) < 1e-4


def test_the_3d_network_overfits_a_few_stacks_to_subvoxel_precision():
    images, truth = stacks(4)
    torch.manual_seed(0)
    model = net.build(net.Params(widths=[8, 16], pixel_size_um=PX, z_step_um=DZ))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, pts = torch.from_numpy(images)[:, None], torch.from_numpy(truth.astype(np.float32))
    for _ in range(150):
        value, _ = net.loss(model, x, pts)
        opt.zero_grad()
        value.backward()
        opt.step()
    det = NetDetector(family("dmdetnet3d"), model, min_score=0.3)
    table = det.detect(images)
    assert sorted(table.frame) == [0, 1, 2, 3]  # one particle each, no false positive
    # A detector with a lower floor, given the cut: the same table (the cut reaches the decoding).
    assert_frame_equal(NetDetector(family("dmdetnet3d"), model, min_score=0.01).detect(images, min_score=0.3), table)
    found = table.sort_values("frame")[["x", "y", "z"]].to_numpy()
    err = found - truth[:, 0]
    assert np.abs(err[:, :2]).max() < 0.5 and np.abs(err[:, 2]).max() < 0.5, err


def test_trackpy_3d_finds_a_fixed_particle_where_the_simulator_put_it():
    """An independent check of the axes: TrackPy's (z, y, x) and the stack truth agree."""
    images, truth = stacks(6, n_qd=60.0)
    det = TrackPyDetector(Params(diameter=9, diameter_z=5, preprocess=True))
    t = det.detect(images)
    best = t.loc[t.groupby("frame").score.idxmax()].sort_values("frame")
    assert list(best.frame) == list(range(6))
    err = best[["x", "y", "z"]].to_numpy() - truth[:, 0]
    assert np.abs(err[:, :2]).max() < 0.5 and np.abs(err[:, 2]).max() < 0.6, err


def test_3d_metrics_by_hand():
    """Two stacks: a match off by (30, 40, 0) nm and one off by (0, 0, 150) nm, one false
    positive 1 um away, one missed particle."""
    gt = Points(np.array([0, 1, 1]), np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.5, 0.5, 0.5]]), 2)
    pred = Points(np.array([0, 1, 0]), np.array([[1.03, 1.04, 1.0], [2.0, 2.0, 2.15], [2.0, 1.0, 1.0]]), 2)
    m = evaluate_points(pred, np.array([0.9, 0.8, 0.7]), gt)  # 3D points: the 3D gates
    assert m["f1"] == pytest.approx(2 * 2 / (3 + 3))
    assert m["rmse_xy_nm"] == pytest.approx(np.sqrt((50**2 + 0) / 2))
    assert m["rmse_z_nm"] == pytest.approx(np.sqrt((0 + 150**2) / 2))
    assert m["auc"]["100"] == pytest.approx(1 / 3 * 1.0)  # the first prediction, then only misses


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory):
    """Tiny stack stores, a 3D model trained one epoch on them by `factory train`."""
    root = tmp_path_factory.mktemp("volumes")
    cfg = yaml.safe_load(open("volumes.yaml"))
    cfg["defaults"]["image"].update(height_px=16, width_px=16)
    cfg["defaults"]["stack"]["n_planes"] = 6
    cfg["datasets"] = {"volumes_train": {"n_stacks": 24}, "volumes_val": {"n_stacks": 12},
                       "test_volumes": {"n_stacks": 12}}
    (root / "v.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli("build", root / "v.yaml", "--out", root / "data", "-q").returncode == 0
    tc = yaml.safe_load(open("configs/dmdetnet3d.yaml"))
    tc.update(epochs=1, val_images=12, model_params={**tc["model_params"], "widths": [4, 8]})
    (root / "t.yaml").write_text(yaml.safe_dump(tc))
    r = run_cli("train", "--config", root / "t.yaml", "--data", root / "data", "--out", root / "model", "-q")
    assert r.returncode == 0, r.stderr
    return root


def test_train_records_the_voxel_size_and_evaluate_and_report_score_stacks(stack_run):
    root = stack_run
    saved = yaml.safe_load((root / "model" / "config.yaml").read_text())
    assert saved["model_params"]["pixel_size_um"] == PX and saved["model_params"]["z_step_um"] == DZ
    for args in (["--model", root / "model"], ["--detector", "trackpy", "--tune-on", "volumes_val"]):
        name = "net" if args[0] == "--model" else "tp"
        r = run_cli("evaluate", *args, "--data", root / "data", "--out", root / "runs" / name, "-q")
        assert r.returncode == 0, r.stderr
        m = json.loads((root / "runs" / name / "metrics.json").read_text())
        assert m["kind"] == "stacks" and {"rmse_xy_nm", "rmse_z_nm", "f1_integral"} <= set(m["datasets"]["test_volumes"])
    r = run_cli("report", root / "runs", "--data", root / "data")
    assert r.returncode == 0, r.stderr
    text = (root / "runs" / "report.md").read_text()
    assert "RMSE z (nm)" in text and (root / "runs" / "stack_test_volumes.png").stat().st_size > 10_000
    store = root / "data" / "test_volumes.h5"
    r = run_cli("inspect", store, "--brief")
    assert r.returncode == 0 and "12 stacks of 6 planes 16x16" in r.stdout, r.stdout + r.stderr
    r = run_cli("preview", store, "--out", root / "pv.png", "--n", "4")
    assert r.returncode == 0 and (root / "pv.png").stat().st_size > 5_000, r.stderr
    # trackpy-paper on stacks gets one line.
    one_line_error(run_cli("evaluate", "--detector", "trackpy-paper", "--data", root / "data", "--out", root / "x"),
                   "z-stacks have one built-in detector")


def test_predict_on_a_stack_larger_than_training_and_bad_input(stack_run, tmp_path):
    import tifffile

    root = stack_run
    big = np.random.default_rng(0).poisson(8.4, (9, 40, 36)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", big, imagej=True, metadata={"spacing": 0.4, "unit": "micron"})
    r = run_cli("predict", root / "model", tmp_path / "stack.tif", "--out", tmp_path / "p.csv", "--all")
    assert r.returncode == 0, r.stderr
    assert "z step: 0.4 um (from the TIFF" in r.stderr
    import pandas as pd

    t = pd.read_csv(tmp_path / "p.csv")
    assert list(t.columns)[:5] == ["frame", "x", "y", "z_um", "score"]
    assert len(t) and t.x.max() > 16 and t.z_um.max() <= 8 * 0.4 + 1e-9
    # T x Z x H x W
    tifffile.imwrite(tmp_path / "series.tif", np.stack([big, big]))
    r = run_cli("predict", root / "model", tmp_path / "series.tif", "--out", tmp_path / "s.csv", "--z-step-um", "0.5")
    assert r.returncode == 0, r.stderr
    assert "2 stack(s)" in r.stdout, r.stdout
    # No z step in the input: the training stacks' (the detector's z_step_um).
    from models.training.runs import load_model

    assert load_model(root / "model").z_step_um == DZ
    np.save(tmp_path / "stack.npy", big)
    r = run_cli("predict", root / "model", tmp_path / "stack.npy", "--out", tmp_path / "n.csv", "--all")
    assert r.returncode == 0 and f"z step: {DZ:g} um (from the model's training data" in r.stderr, r.stderr
    # Bad input: a 2D image to a 3D model, a z step <= 0.
    tifffile.imwrite(tmp_path / "flat.tif", big[0])
    for args, msg in ((["flat.tif"], "needs a z-stack"), (["stack.tif", "--z-step-um", "0"], "z step must be > 0"),
                      (["stack.tif", "--z-step-um", "-1"], "z step must be > 0")):
        r = run_cli("predict", root / "model", tmp_path / args[0], *args[1:], "--out", tmp_path / "bad.csv")
        one_line_error(r, msg)
        assert not (tmp_path / "bad.csv").exists()
