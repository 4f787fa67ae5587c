"""Run folders end to end through the CLI: train -> contents -> resume -> evaluate ->
predict, reproduction from the run's own config.yaml, the non-finite-loss stop, and
refusing weight files that are code."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml

from conftest import one_line_error, run_cli
from models.training.runs import RunFolder

TINY = {"model": "spotnet", "model_params": {"widths": [8, 16], "flip_tta": False}, "epochs": 1,
        "batch_size": 8, "schedule": "constant", "lr": 0.005, "val_images": 64, "seed": 1,
        "min_score": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = root / "d.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 11, "defaults": {"output": {"chunk_images": 64, "trajectories": False},
                                                            "particles": {"n_qd": 40.0}},
                                   "datasets": {"train": {"n_images": 640}, "val": {"n_images": 64},
                                                "test_d075": {"n_images": 64, "particles": {"diffusion_um2_s": 0.75}},
                                                **{name: {"n_movies": n, "movie": {"n_frames": 8},
                                                          "image": {"height_px": 32, "width_px": 32},
                                                          "particles": {"count": {"mean": 2, "max": 5},
                                                                        "diffusion_um2_s": {"low": 0.05, "high": 0.5}}}
                                                   for name, n in (("movies_train", 16), ("movies_val", 8))}}}))
    r = run_cli("build", cfg, "--out", root / "data", "-q")
    assert r.returncode == 0, r.stderr
    return root / "data"


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
    """The TINY recipe trained once on ``data``: a run folder the tests read, not change."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    r = run_cli("train", "--config", root / "tiny.yaml", "--data", data, "--out", root / "run", "-q")
    assert r.returncode == 0, r.stderr
    return root / "run"


def test_train_resume_evaluate_predict_and_reproduce(data, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    run = RunFolder(tmp_path / "run")
    r = run_cli("train", "--config", recipe, "--data", data, "--out", run.path, "-q")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in run.path.iterdir()} == {"config.yaml", "best.pt", "last.pt", "metrics.json"}
    cfg = run.read_config()
    assert cfg.model_params == {"widths": [8, 16], "se": False, "flip_tta": False, "heads": 1, "branch": "head",
                                "branch_stride": 1}
    assert cfg.data == str(data)
    m = run.read_metrics()
    assert len(m["history"]) == 1 and m["best_epoch"] == 1 and 0 <= m["threshold"] < 1
    assert set(m["history"][0]["val_auc"]) == {"70", "140", "210"}
    last = torch.load(run.file("last.pt"), weights_only=True)
    assert last["epoch"] == 0 and set(last) >= {"model", "optimizer", "scheduler", "history"}

    # --resume continues from last.pt: epoch 1 is kept as it was, epoch 2 is added.
    r = run_cli("train", "--data", data, "--out", run.path, "--resume", "--epochs", "2", "-q")
    assert r.returncode == 0, r.stderr
    m2 = run.read_metrics()
    assert [h["epoch"] for h in m2["history"]] == [1, 2]
    assert m2["history"][0] == m["history"][0]
    assert run.read_config().epochs == 2

    # The run's own config.yaml reproduces it (same data, seed, schedule: same losses).
    r = run_cli("train", "--config", run.file("config.yaml"), "--out", tmp_path / "again", "-q")
    assert r.returncode == 0, r.stderr
    again = RunFolder(tmp_path / "again").read_metrics()
    np.testing.assert_allclose([h["loss"] for h in again["history"]], [h["loss"] for h in m2["history"]], rtol=1e-5)

    # evaluate --model on both runs; the report gives each its row.
    for name in ("run", "again"):
        r = run_cli("evaluate", "--model", tmp_path / name, "--data", data, "--out", tmp_path / "evals" / name, "-q")
        assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "evals" / "run" / "metrics.json").read_text())
    assert ev["threshold"] == m2["threshold"] and set(ev["datasets"]["test_d075"]["auc"]) == {"70", "140", "210"}
    r = run_cli("report", tmp_path / "evals", "--data", data)
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "evals" / "report.md").read_text().split("## Other metrics")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| SpotNet")]
    assert len(rows) == 2 and any("[run]" in r for r in rows) and any("[again]" in r for r in rows), rows

    # predict: above the tuned threshold by default, every candidate with --all.
    from factory.stores import Store

    with Store(data / "test_d075.h5") as st:
        tifffile.imwrite(tmp_path / "movie.tif", st.read("images", 0, 10))
    r = run_cli("predict", run.path, tmp_path / "movie.tif", "--out", tmp_path / "p.csv", "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("predict", run.path, tmp_path / "movie.tif", "--out", tmp_path / "all.csv", "--all", "-q")
    assert r.returncode == 0, r.stderr
    cut, every = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "all.csv")
    assert len(every) > len(cut) > 0
    assert (cut.score >= m2["threshold"]).all() and (every.score < m2["threshold"]).any()
    pd.testing.assert_frame_equal(cut.reset_index(drop=True),
                                  every[every.score >= m2["threshold"]].reset_index(drop=True))


def test_a_typo_in_model_params_names_the_file_and_field(data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "model_params": {"widthz": [4, 8]}}))
    r = run_cli("train", "--config", bad, "--data", data, "--out", tmp_path / "o")
    one_line_error(r, "bad.yaml", "model_params.widthz: unknown key")
    bad.write_text(yaml.safe_dump({**TINY, "epochs": "2"}))
    one_line_error(run_cli("train", "--config", bad, "--data", data, "--out", tmp_path / "o"), "bad.yaml", "epochs")
    assert not (tmp_path / "o" / "best.pt").exists()


def test_a_non_finite_loss_stops_training_with_a_clear_message(data, tmp_path):
    """A store whose truth was corrupted (a centroid at 3e38 px) makes the offset loss
    overflow: training stops at once, naming the epoch and step."""
    import h5py

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("train.h5", "val.h5"):
        shutil.copy(data / name, corrupt / name)
    with h5py.File(corrupt / "train.h5", "r+") as f:
        c = f["centroids"][:]
        c[:, 0, 0] = 3e38
        f["centroids"][:] = c
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    r = run_cli("train", "--config", recipe, "--data", corrupt, "--out", tmp_path / "o", "-q")
    one_line_error(r, "non-finite loss at epoch 1, step 1")
    assert not (tmp_path / "o" / "best.pt").exists()


class _RunsACommand:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_that_are_code_are_refused_and_never_run(data, tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"model": _RunsACommand(marker)}, run / "best.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).poisson(8.4, (2, 24, 25)).astype(np.float32))
    r = run_cli("predict", run, tmp_path / "x.npy", "--out", tmp_path / "p.csv")
    one_line_error(r, "best.pt: not a plain weights file")
    r = run_cli("evaluate", "--model", run, "--data", data, "--out", tmp_path / "ev")
    one_line_error(r, "best.pt: not a plain weights file")
    assert not marker.exists()
    assert not (tmp_path / "p.csv").exists()
    # The same for a user's weights file handed to Keypoint R-CNN.
    torch.save(_RunsACommand(marker), tmp_path / "coco.pth")
    krcnn = tmp_path / "krcnn.yaml"
    krcnn.write_text(yaml.safe_dump({"model": "keypointrcnn", "epochs": 1, "max_train_images": 16, "val_images": 16,
                                     "model_params": {"weights_path": str(tmp_path / "coco.pth"), "min_size": 32}}))
    r = run_cli("train", "--config", krcnn, "--data", data, "--out", tmp_path / "k")
    one_line_error(r, "coco.pth: not a plain weights file")
    assert not marker.exists()


def test_a_model_with_a_head_per_target_trains_on_two_stores_and_serves_both(data, tiny_run, tmp_path):
    """`target: both` on images and movies: one backbone, a head per target, each head
    validated and thresholded on its own truth; predict and track pick the head."""
    from models.training.runs import load_model

    recipe = tmp_path / "both.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "target": "both", "train": ["train", "movies_train"],
                                      "val": ["val", "movies_val"], "store_targets": {"movies_train": "exposure"}}))
    run = RunFolder(tmp_path / "run")
    r = run_cli("train", "--config", recipe, "--data", data, "--out", run.path, "-q")
    assert r.returncode == 0, r.stderr
    cfg, m = run.read_config(), run.read_metrics()
    assert cfg.model_params["heads"] == 2 and cfg.train == ["train", "movies_train"]
    assert set(m["thresholds"]) == {"centroid", "exposure"} and m["threshold"] == m["thresholds"]["centroid"]
    assert set(m["history"][0]["val_auc_by"]) == {f"{t} on {s}" for t in ("centroid", "exposure")
                                                  for s in ("val", "movies_val")}
    assert m["train_images"] == 640 + 16 * 8
    # Each head's int8 ranges are recorded, so `factory track` can run the head in int8.
    assert set(m["int8_ranges"]) == {"centroid", "exposure"}
    assert load_model(run.path, target="exposure", precision="auto").precision == "int8"
    centroid, exposure = load_model(run.path), load_model(run.path, target="exposure")
    assert (centroid.head, centroid.target, exposure.head, exposure.target) == (0, "centroid", 1, "exposure")
    assert exposure.threshold == m["thresholds"]["exposure"] and exposure.timestamps == "scan"
    from factory.stores import Store

    with Store(data / "movies_val.h5") as st:
        frames = st.read("images", 0, 8)
    a, b = centroid.detect(frames), exposure.detect(frames)
    assert len(a) and len(b) and not (len(a) == len(b) and np.allclose(a[["x", "y"]], b[["x", "y"]]))
    # The CLI: predict picks the head; a head the model lacks is one line.
    tifffile.imwrite(tmp_path / "m.tif", frames)
    r = run_cli("predict", run.path, tmp_path / "m.tif", "--out", tmp_path / "p.csv", "--target", "exposure")
    assert r.returncode == 0, r.stderr
    r = run_cli("track", run.path, tmp_path / "m.tif", "--out", tmp_path / "tracks", "--linker", "stitch")
    assert r.returncode == 0, r.stderr
    used = json.loads((tmp_path / "tracks" / "track.json").read_text())
    assert used["time_stamps"] == "scan" and used["target"] == "exposure"
    # Without flags, the settings come from both training stores: the timing from the
    # movie store, the D range over both (train: the schema's 0.75 - 1.75, movies_train
    # 0.05 - 0.5 um^2/s).
    assert (f"(from the training data {data / 'train.h5'}, {data / 'movies_train.h5'})" in r.stderr
            and "linking (stitch) for D from 0.05 up to 1.75 um^2/s" in r.stderr), r.stderr
    # A one-head model asked for the other head, and target: both on a one-head family.
    one_line_error(run_cli("predict", tiny_run, tmp_path / "m.tif", "--out", tmp_path / "q.csv",
                           "--target", "exposure"), "has no exposure output")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "gridnet", "target": "both"}))
    one_line_error(run_cli("train", "--config", bad, "--data", data, "--out", tmp_path / "x"), "target: both")
    bad.write_text(yaml.safe_dump({**TINY, "model_params": {"heads": 2}}))
    one_line_error(run_cli("train", "--config", bad, "--data", data, "--out", tmp_path / "x"), "model_params.heads")
    bad.write_text(yaml.safe_dump({**TINY, "target": "both", "store_targets": {"movies": "exposure"}}))
    one_line_error(run_cli("train", "--config", bad, "--data", data, "--out", tmp_path / "x"),
                   "store_targets: movies is not a train or val store")


@pytest.mark.parametrize("branch_stride", [1, 2])
def test_a_second_head_learns_on_a_frozen_first_model(data, tiny_run, tmp_path, branch_stride):
    """init_from a one-headed run + freeze [unet, head] + branch: decoder: the centroid
    head of the two-headed model is the loaded model bit for bit (weights, batch-norm
    statistics, detections), while the exposure head, started as its copy, has learned."""
    import torch

    from factory.stores import Store
    from models.training.runs import load_model

    # Validation during training ran the network in inference mode: the saved model scores
    # on the validation set exactly what the history says (batch norm on running statistics,
    # left unmoved by the validation images).
    from models.evaluation.truth import geometry, truth
    from models.evaluation.tuning import validate

    with Store(data / "val.h5") as st:
        images, gt = st.read("images", 0, TINY["val_images"]), truth(st, "centroid", 0, TINY["val_images"])
        geom = geometry(st)
    hist = RunFolder(tiny_run).read_metrics()["history"]
    assert validate(load_model(tiny_run), images, gt, geom)["mean_auc"] == hist[-1]["val_mean_auc"]
    recipe = {**TINY, "model_params": {**TINY["model_params"], "branch": "decoder", "branch_stride": branch_stride},
              "target": "both",
              "init_from": str(tiny_run), "freeze": ["unet", "head"], "train": ["train", "movies_train"],
              "val": ["val", "movies_val"], "store_targets": {"train": "exposure", "movies_train": "exposure",
                                                              "val": "centroid", "movies_val": "exposure"}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(recipe))
    r = run_cli("train", "--config", tmp_path / "two.yaml", "--data", data, "--out", tmp_path / "two", "-q")
    assert r.returncode == 0, r.stderr
    one = torch.load(tiny_run / "best.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "best.pt", weights_only=True)["model"]
    assert {k for k in two if k not in one} and all(k.startswith("extra_") for k in two if k not in one)
    for k, v in one.items():  # running means and variances included
        assert torch.equal(two[k], v), k
    copied = {k.replace("extra_decoders.0", "unet.up").replace("extra_heads.0", "head"): v
              for k, v in two.items() if k.startswith("extra_") and v.is_floating_point()}
    assert any(not torch.equal(v, one[k]) for k, v in copied.items())
    m = RunFolder(tmp_path / "two").read_metrics()
    assert m["init_from"]["tensors_loaded"] == len(one) and len(m["init_from"]["sha256"]) == 64
    with Store(data / "val.h5") as st:
        images = st.read("images", 0, 32)
    a, b = load_model(tiny_run).detect(images), load_model(tmp_path / "two").detect(images)
    pd.testing.assert_frame_equal(a[["frame", "x", "y", "score"]], b[["frame", "x", "y", "score"]])
    # The exposure head runs in int8 as `factory track` runs it (its ranges recorded in training).
    exposure = RunFolder(tmp_path / "two").detector(target="exposure", precision="int8")
    assert exposure.precision == "int8" and len(exposure.detect(images))
    if branch_stride == 2:
        return
    # Bad recipes: one line each, naming the field.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "freeze": ["unet"]}))
    one_line_error(run_cli("train", "--config", bad, "--data", data, "--out", tmp_path / "x"), "freeze")
    bad.write_text(yaml.safe_dump({**recipe, "freeze": ["backbone"]}))
    one_line_error(run_cli("train", "--config", bad, "--data", data, "--out", tmp_path / "x"),
                   "freeze: 'backbone' names no parameter")
    one_line_error(run_cli("train", "--config", tmp_path / "two.yaml", "--data", data, "--out", tmp_path / "x",
                           "--init-from", tmp_path / "none"), "init_from:", "none: no such run folder")
    assert not (tmp_path / "x" / "best.pt").exists()


def test_a_relative_data_folder_is_found_from_anywhere(tiny_run, data, tmp_path, monkeypatch):
    """A run trained with `--data data` records the relative folder; `factory track` run
    from another folder looks for it from the run folder upwards, and says so."""
    from models.recordings.predict import training_datasets

    project = tmp_path / "project"
    (project / "runs" / "m").mkdir(parents=True)
    (project / "data").symlink_to(data, target_is_directory=True)
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg["data"] = "data"
    (project / "runs" / "m" / "config.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    found, source = training_datasets(project / "runs" / "m")
    train = [cfg["train"]] if isinstance(cfg["train"], str) else cfg["train"]
    assert len(found) == len(train) and source == "the training data " + ", ".join(
        str(project.resolve() / "data" / f"{n}.h5") for n in train)
    # From inside the project the working directory wins, as before.
    monkeypatch.chdir(project)
    assert training_datasets(Path("runs/m"))[1] == "the training data " + ", ".join(f"data/{n}.h5" for n in train)
