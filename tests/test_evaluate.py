"""The evaluator end to end: run folders, CSV scoring and bad input."""

import json

import pandas as pd
import pytest
import yaml

from conftest import one_line_error, run_cli
from factory.stores import Store


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 3, "defaults": {"output": {"chunk_images": 64}}, "datasets": {
        "val": {"n_images": 120},
        "test_d075": {"n_images": 100, "particles": {"diffusion_um2_s": 0.75}},
        "test_d175": {"n_images": 90, "particles": {"diffusion_um2_s": 1.75}}}}))
    assert run_cli("build", cfg, "--out", root / "data", "-q").returncode == 0
    return root / "data"


def truth_csv(store, path, shift=0.0):
    with Store(store) as st:
        c, n = st.read("centroids"), st.read("n_particles")
    rows = [(i, c[i, p, 0] + shift, c[i, p, 1], 1.0) for i in range(len(n)) for p in range(n[i])]
    pd.DataFrame(rows, columns=["frame", "x", "y", "score"]).to_csv(path, index=False)


def test_trackpy_run_folder(data, tmp_path):
    out = tmp_path / "run"
    r = run_cli("evaluate", "--detector", "trackpy", "--data", data, "--out", out, "-q", "--tune-images", "60")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["datasets"]) == {"test_d075", "test_d175"}
    for v in m["datasets"].values():
        assert set(v["auc"]) == {"70", "140", "210"} and 0 <= v["auc"]["210"] <= 1
        assert {"f1_integral", "f1", "rmse_px", "n_images"} <= set(v)
    assert m["datasets"]["test_d075"]["n_images"] == 100
    tuned = json.loads((out / "trackpy.json").read_text())
    assert tuned["tuned_on"].endswith("val.h5") and len(tuned["grid"]) > 1
    md = (out / "table.md").read_text()
    assert "TrackPy (paper)" in md and "Keypoint R-CNN (paper)" in md and "TrackPy (ours, tuned on val)" in md
    assert "| 0.06 | 0.42 | 0.73 |" in md  # the paper's row under D = 0.75
    assert (out / "pr_test_d075.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(out / "table.csv")
    assert {"detector", "dataset", "eps_nm", "auc"} <= set(table.columns)
    # The saved parameters reproduce the run without tuning.
    out2 = tmp_path / "run2"
    r = run_cli("evaluate", "--detector", "trackpy", "--params", out / "trackpy.json", "--data", data, "--out", out2, "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((out2 / "metrics.json").read_text())["datasets"] == m["datasets"]


def test_score_a_users_csv(data, tmp_path):
    csv = tmp_path / "perfect.csv"
    truth_csv(data / "test_d075.h5", csv)
    r = run_cli("evaluate", "--predictions", csv, "--data", data / "test_d075.h5", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())["datasets"]["test_d075"]
    assert m["auc"] == {"70": 1.0, "140": 1.0, "210": 1.0} and m["f1"] == 1.0 and m["rmse_px"] < 1e-5
    off = tmp_path / "off.csv"
    truth_csv(data / "test_d075.h5", off, shift=1.5)
    r = run_cli("evaluate", "--predictions", off, "--data", data, "--datasets", "test_d075", "--out", tmp_path / "o2")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "o2" / "metrics.json").read_text())["datasets"]["test_d075"]
    assert m["auc"]["70"] == 0.0 and m["auc"]["140"] == 1.0


def test_trackpy_with_the_papers_settings(data, tmp_path):
    out = tmp_path / "paper"
    r = run_cli("evaluate", "--detector", "trackpy-paper", "--data", data, "--out", out, "-q", "--tune-images", "60")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["detector"] == "TrackPy (ours, paper settings)"
    assert m["params"] == {"diameter": 7, "diameter_z": None, "minmass": 0.0, "separation": 7.0, "percentile": 64.0,
                           "preprocess": False}
    assert m["threshold"] is not None  # its F1 operating point, chosen on val


def test_gates_are_physical_on_a_store_with_other_pixels(tmp_path):
    """0.1 um pixels: 70 / 140 / 210 nm are 0.7 / 1.4 / 2.1 px, keys stay in nm, and a
    prediction 1.5 px (150 nm) from the truth counts at 210 nm but not at 140 nm."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 5, "datasets": {"test_coarse": {
        "n_images": 80, "image": {"pixel_size_um": 0.1}, "output": {"chunk_images": 64}}}}))
    assert run_cli("build", cfg, "--out", tmp_path / "data", "-q").returncode == 0
    csv = tmp_path / "off.csv"
    truth_csv(tmp_path / "data" / "test_coarse.h5", csv, shift=1.5)
    r = run_cli("evaluate", "--predictions", csv, "--data", tmp_path / "data", "--out", tmp_path / "o", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())["datasets"]["test_coarse"]
    assert m["auc"] == {"70": 0.0, "140": 0.0, "210": 1.0}
    assert m["pixel_size_um"] == 0.1
    r = run_cli("evaluate", "--predictions", csv, "--data", tmp_path / "data", "--out", tmp_path / "o2", "-q",
                "--gates-nm", "100,160")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "o2" / "metrics.json").read_text())["datasets"]["test_coarse"]
    assert m["auc"] == {"100": 0.0, "160": 1.0}
    bad(run_cli("evaluate", "--predictions", csv, "--data", tmp_path / "data", "--out", tmp_path / "o3",
                "--gates-nm", "70,-1"), "--gates-nm 70,-1")


def test_pooled_metrics_over_stores_of_different_pixel_sizes():
    """Pooled in um: the gates keep their physical size in every store."""
    from models.evaluation.evaluate import pooled_metrics
    from models.evaluation.truth import Geometry

    gt_px = pd.DataFrame({"frame": [0, 1], "x": [5.0, 5.0], "y": [5.0, 5.0]})
    # 1.5 px off: 105 nm at 0.07 um, 150 nm at 0.1 um.
    # The first store's pair ranks first (score 1): within 140 nm; the second's (0.5) not.
    tables = [pd.DataFrame({"frame": [0, 1], "x": [6.5, 6.5], "y": [5.0, 5.0], "score": [s, s]}) for s in (1.0, 0.5)]
    geoms = [Geometry(0.07), Geometry(0.1)]
    m = pooled_metrics(tables, [g.points(gt_px, 2) for g in geoms], geoms, None)
    assert m["auc"]["140"] == pytest.approx(0.5) and m["auc"]["210"] == pytest.approx(1.0)
    assert m["rmse_px"] is None and m["rmse_nm"] == pytest.approx(105.0)  # pairs within 140 nm only
    geoms = [Geometry(0.07)] * 2
    same = pooled_metrics(tables, [g.points(gt_px, 2) for g in geoms], geoms, None)
    assert same["auc"]["140"] == pytest.approx(1.0) and same["rmse_px"] == pytest.approx(1.5)


def test_report_gathers_every_evaluation_and_previews_the_best(data, tmp_path):
    runs = tmp_path / "runs"
    for name, shift in (("perfect", 0.0), ("offset", 1.5)):
        csv = tmp_path / f"{name}.csv"
        truth_csv(data / "test_d075.h5", csv, shift=shift)
        r = run_cli("evaluate", "--predictions", csv, "--data", data, "--datasets", "test_d075",
                    "--out", runs / name, "-q")
        assert r.returncode == 0, r.stderr
    r = run_cli("report", runs, "--data", data)
    assert r.returncode == 0, r.stderr
    md = (runs / "report.md").read_text()
    table1 = md.split("## Other metrics")[0]
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in table1.splitlines() if ln.startswith("| ")}
    assert "TrackPy (paper)" in rows and "Keypoint R-CNN (paper)" in rows
    assert "| 1.00 | 1.00 | 1.00 |" in rows["perfect"]  # D = 0.75: every gate
    assert "| 0.00 | 1.00 | 1.00 |" in rows["offset"]  # 1.5 px = 105 nm off
    assert "perfect on the first" in md  # the preview shows the better detector
    assert (runs / "preview_predictions.png").read_bytes()[:4] == b"\x89PNG"
    assert "offset/pr_test_d075.png" in md


bad = one_line_error


def test_bad_input_to_evaluate(data, tmp_path):
    bad(run_cli("evaluate", "--detector", "trackpy", "--data", tmp_path / "nope", "--out", tmp_path / "o"),
        "nope: no such data folder")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("frame,x,y\n0,1,2\n")
    bad(run_cli("evaluate", "--predictions", nocol, "--data", data / "test_d075.h5", "--out", tmp_path / "o"),
        "nocol.csv", "missing column(s) score")
    far = tmp_path / "far.csv"
    far.write_text("frame,x,y,score\n0,1,2,1\n5000,1,2,1\n")
    bad(run_cli("evaluate", "--predictions", far, "--data", data / "test_d075.h5", "--out", tmp_path / "o"),
        "far.csv", "frame 5000 is out of range")
    text = tmp_path / "text.csv"
    text.write_text("frame,x,y,score\n0,a,2,1\n")
    bad(run_cli("evaluate", "--predictions", text, "--data", data / "test_d075.h5", "--out", tmp_path / "o"),
        "column x must be numeric")
    bad(run_cli("evaluate", "--predictions", far, "--data", data, "--out", tmp_path / "o"), "pick it with --datasets")
    bad(run_cli("evaluate", "--detector", "trackpy", "--data", data, "--tune-on", "test_d075", "--out", tmp_path / "o"),
        "would leak")
    bad(run_cli("evaluate", "--data", data, "--out", tmp_path / "o"), "exactly one of")
    bad(run_cli("evaluate", "--detector", "magic", "--data", data, "--out", tmp_path / "o"), "unknown")
