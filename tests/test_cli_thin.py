"""Each command is one call to one library function: called directly, the function gives
what the command prints (stdout lines, error lines, exit status), on real stores built by
the library."""

import os
import re
import shutil
from pathlib import Path

import h5py
import pytest
import yaml

from conftest import one_line_error, run_cli
from factory import FactoryError, build_from_config, preview_store, schema_text, slurm_jobs, verify_stores

CONFIG = {"seed": 11, "defaults": {"output": {"chunk_images": 64}, "particles": {"n_qd": 40.0}},
          "datasets": {"imgs": {"n_images": 128},
                       "mov": {"n_movies": 16, "movie": {"n_frames": 8}, "image": {"height_px": 32, "width_px": 32},
                               "particles": {"count": {"mean": 2, "max": 5}}}}}


def _seconds(lines):
    """Build lines with their wall time blanked (the only part that differs run to run)."""
    return [re.sub(r"\d+\.\d+ s$", "T s", line) for line in lines]


def _error(exc_info) -> str:
    """The line a command prints for a FactoryError."""
    return f"error: {exc_info.value}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("thin")
    (root / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    return root


@pytest.fixture(scope="module")
def stores(root):
    """Both datasets built by the library into <root>/data."""
    results = build_from_config(root / "cfg.yaml", root / "data", progress=False, report=lambda line: None)
    return {r.name: r.path for r in results}


def test_schema_text_is_what_schema_prints():
    r = run_cli("schema")
    assert r.returncode == 0, r.stderr
    assert r.stdout == schema_text() + "\n"
    assert schema_text().splitlines()[1].startswith("A dataset name starts with a letter or digit")


def test_build_from_config_gives_the_lines_build_prints(root, stores):
    estimate = []
    results = build_from_config(root / "cfg.yaml", root / "lib", only=["imgs"], progress=False, report=estimate.append)
    assert [r.name for r in results] == ["imgs"] and results[0].path == root / "lib" / "imgs.h5"
    assert results[0].summary().startswith("128 images, ") and estimate[-1].startswith("estimate: about")
    r = run_cli("build", root / "cfg.yaml", "--out", root / "lib", "--only", "imgs", "-q", "--overwrite")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert _seconds(r.stdout.splitlines()) == _seconds([f"{x.path}: {x.summary()}" for x in results])
    # An existing store, a bad name, a missing config: the command's own error line.
    for kwargs, args in (({}, ()), ({"only": ["nope"]}, ("--only", "nope"))):
        with pytest.raises(FactoryError) as e:
            build_from_config(root / "cfg.yaml", root / "lib", progress=False, **kwargs)
        assert one_line_error(run_cli("build", root / "cfg.yaml", "--out", root / "lib", "-q", *args)) == _error(e)


def test_build_from_config_builds_shards_from_the_shard_spec(root, stores):
    sh = root / "sh"
    first = build_from_config(root / "cfg.yaml", sh, shard="0/2", progress=False)
    second = build_from_config(root / "cfg.yaml", sh, shard=(1, 2), progress=False)
    assert [r.shard for r in first + second] == [(0, 2)] * 2 + [(1, 2)] * 2
    assert all(re.fullmatch(r"64 images, \d+\.\d\d s", r.summary()) for r in first + second)
    # Built again: skipped, the same lines as the command's.
    again = build_from_config(root / "cfg.yaml", sh, shard="1/2", progress=False)
    assert [r.summary() for r in again] == ["complete and valid, skipped"] * 2
    r = run_cli("build", root / "cfg.yaml", "--out", sh, "--shard", "1/2", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{x.path}: {x.summary()}" for x in again]
    # A bad spec, and a missing config before a bad spec.
    for config, spec in ((root / "cfg.yaml", "2/2"), (root / "cfg.yaml", "x"), (root / "none.yaml", "x")):
        with pytest.raises(FactoryError) as e:
            build_from_config(config, sh, shard=spec, progress=False)
        assert one_line_error(run_cli("build", config, "--out", sh, "--shard", spec, "-q")) == _error(e)


def test_verify_stores_returns_the_failures_verify_exits_1_on(root, stores):
    seen = []
    assert verify_stores(root / "data", report=lambda store, problems: seen.append((store, problems))) == {}
    assert seen == [(stores["imgs"], []), (stores["mov"], [])]
    r = run_cli("verify", root / "data")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.splitlines() == [f"{store}: ok" for store, _ in seen]

    bad = root / "bad"
    bad.mkdir()
    for store in stores.values():
        shutil.copy(store, bad / store.name)
    with h5py.File(bad / "imgs.h5", "r+") as f:
        f["images"][3] = f["images"][3] + 1
    failures = verify_stores(bad)
    assert list(failures) == [bad / "imgs.h5"] and all(str(bad / "imgs.h5") in line for line in failures[bad / "imgs.h5"])
    r = run_cli("verify", bad)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"error: {line}" for line in failures[bad / "imgs.h5"]]
    assert r.stdout.splitlines() == [f"{bad / 'mov.h5'}: ok"]

    with pytest.raises(FactoryError) as e:
        verify_stores(root / "nothing.h5")
    assert one_line_error(run_cli("verify", root / "nothing.h5")) == _error(e)


def test_slurm_jobs_writes_and_submits_what_slurm_prints(root, tmp_path, monkeypatch):
    out = tmp_path / "sl"
    lines = []
    jobs = slurm_jobs(root / "cfg.yaml", out, 3, only=["imgs"], time="02:00:00", report=lines.append)
    assert lines == [f"wrote {out / 'slurm' / 'build.sbatch'}", f"wrote {out / 'slurm' / 'finalize.sbatch'}"]
    assert (jobs.build_script, jobs.finalize_script, jobs.array_job) == (out / "slurm" / "build.sbatch",
                                                                          out / "slurm" / "finalize.sbatch", None)
    scripts = {p: p.read_text() for p in (jobs.build_script, jobs.finalize_script)}
    r = run_cli("slurm", root / "cfg.yaml", "--shards", "3", "--out", out, "--only", "imgs", "--time", "02:00:00")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout == "\n".join([*lines, jobs.summary()]) + "\n"
    assert {p: p.read_text() for p in scripts} == scripts

    # Submitted: an sbatch that answers as SLURM's does (array "id;cluster", then the finalize id).
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text('#!/bin/sh\ncase "$*" in *dependency*) echo 1002;; *) echo "1001;c";; esac\n')
    (bin_ / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    jobs = slurm_jobs(root / "cfg.yaml", out, 2, submit=True, report=lambda line: None)
    assert (jobs.array_job, jobs.finalize_job) == ("1001", "1002")
    assert jobs.summary() == "submitted array job 1001 (2 tasks) and finalize job 1002 (afterok:1001)"
    r = run_cli("slurm", root / "cfg.yaml", "--shards", "2", "--out", out, "--submit")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == jobs.summary()

    for args in ((["nope"], "01:00:00"), (None, "soon")):
        with pytest.raises(FactoryError) as e:
            slurm_jobs(root / "cfg.yaml", tmp_path / "x", 2, only=args[0], time=args[1])
        flags = ["--only", "nope"] if args[0] else ["--time", args[1]]
        assert one_line_error(run_cli("slurm", root / "cfg.yaml", "--shards", "2", "--out", tmp_path / "x", *flags)) == _error(e)
    assert not (tmp_path / "x").exists()


def test_preview_store_draws_what_preview_writes(stores, tmp_path):
    assert preview_store(stores["imgs"], tmp_path / "lib.png", 4, 2) == tmp_path / "lib.png"
    r = run_cli("preview", stores["imgs"], "--out", tmp_path / "cli.png", "--n", "4", "--start", "2")
    assert r.returncode == 0 and r.stdout == f"{tmp_path / 'cli.png'}\n", r.stderr
    assert (tmp_path / "lib.png").read_bytes() == (tmp_path / "cli.png").read_bytes()

    assert preview_store(stores["mov"], tmp_path / "mov.gif", movie=1) == tmp_path / "mov.gif"
    assert (tmp_path / "mov.gif").read_bytes()[:6] == b"GIF89a"

    bad = [(stores["imgs"], "a.bmp", {}), (stores["imgs"], "a.gif", {}), (stores["imgs"], "a.png", {"start": 128}),
           (stores["mov"], "a.png", {"movie": 16}), (tmp_path / "nothing.h5", "a.png", {})]
    for store, name, kwargs in bad:
        with pytest.raises(FactoryError) as e:
            preview_store(store, tmp_path / name, **kwargs)
        flags = [f"--{k}={v}" for k, v in kwargs.items()]
        assert one_line_error(run_cli("preview", store, "--out", tmp_path / name, *flags)) == _error(e)
        assert not (tmp_path / name).exists()


def test_preview_store_enters_the_stage_before_it_opens_the_store(stores, tmp_path):
    from models.recordings.outputs import staged_output

    (tmp_path / "old.png").write_bytes(b"an earlier picture")

    def stage(picture: Path):
        return staged_output(picture, "file", overwrite=False, what="picture")

    with pytest.raises(FactoryError, match="old.png: already exists") as e:
        preview_store(stores["imgs"], tmp_path / "old.png", start=128, stage=stage)
    r = run_cli("preview", stores["imgs"], "--out", tmp_path / "old.png", "--start", "128")
    assert one_line_error(r) == _error(e)
    assert (tmp_path / "old.png").read_bytes() == b"an earlier picture"


@pytest.fixture(scope="module")
def training_data(root):
    config = root / "train_data.yaml"
    config.write_text(yaml.safe_dump({"seed": 11, "defaults": {"output": {"chunk_images": 64, "trajectories": False},
                                                               "particles": {"n_qd": 40.0}},
                                      "datasets": {"train": {"n_images": 128}, "val": {"n_images": 64}}}))
    build_from_config(config, root / "td", progress=False, report=lambda line: None)
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"model": "spotnet", "model_params": {"widths": [8, 16], "flip_tta": False},
                                      "epochs": 1, "batch_size": 8, "schedule": "constant", "lr": 0.005,
                                      "val_images": 32, "seed": 1, "min_score": 0.0}))
    return root / "td", recipe


def test_train_gives_the_run_and_the_line_train_prints(training_data, tmp_path):
    from models import train

    data, recipe = training_data
    run, summary = train(recipe, data, tmp_path / "lib", progress=False)
    assert run == tmp_path / "lib" and (run / "best.pt").is_file()
    assert re.fullmatch(r"best epoch 1 of 1, validation AUC [0-9.]+ / [0-9.]+ / [0-9.]+ at 70 / 140 / 210 nm, "
                        r"F1 threshold [0-9.]+, [0-9.]+ min", summary), summary
    r = run_cli("train", "--config", recipe, "--data", data, "--out", tmp_path / "cli", "-q")
    assert r.returncode == 0, r.stderr
    minutes = re.compile(r", [0-9.]+ min$")
    assert minutes.sub("", r.stdout.rstrip("\n")) == minutes.sub("", f"{tmp_path / 'cli'}: {summary}")

    # --resume without a config reads the run's own; nothing to resume is the command's error.
    for args in ((None, data, tmp_path / "none"), (recipe, data, tmp_path / "lib")):
        with pytest.raises(FactoryError) as e:
            train(*args, resume=args[0] is None, progress=False)
        flags = (["--config", args[0]] if args[0] else ["--resume"]) + ["--data", args[1], "--out", args[2], "-q"]
        assert one_line_error(run_cli("train", *flags), code=None) == _error(e)
