"""The Python API: the README's example runs as written and gives what the commands
give; `import models` and `import factory` stay cheap."""

import json
import re
import subprocess
import sys
from importlib import import_module

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import ROOT, run_cli


def readme_example() -> str:
    """The Python block of the README's "Python API" section, as a user copies it."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Python API\n.*?^```python\n(.*?)^```", text, re.S | re.M)
    assert m, "README.md: no Python block under ## Python API"
    return m.group(1)


def cli(*args):
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """What the README's block reads: a data folder with val and test_d075 (built with
    the factory API), a movie of two bright particles away from the edges, and a
    recording (its first frames)."""
    from factory import build_stores, parse_config, simulate

    root = tmp_path_factory.mktemp("api")
    stores = parse_config({"seed": 3, "datasets": {
        "val": {"n_images": 40}, "test_d075": {"n_images": 30, "particles": {"diffusion_um2_s": 0.75}}}})
    assert [r.n_images for r in build_stores(stores, root / "data", progress=False)] == [40, 30]
    movie = parse_config({"seed": 8, "datasets": {"m": {
        "n_movies": 1, "movie": {"n_frames": 12, "margin_um": 0.0}, "image": {"height_px": 40, "width_px": 40},
        "particles": {"count": {"type": "fixed", "n": 2}, "diffusion_um2_s": 0.1, "n_qd": 60.0,
                      "xy_start": {"type": "uniform", "margin_px": 10}}}}})
    frames = simulate(movie.datasets["m"], movie.seed)["images"]
    tifffile.imwrite(root / "movie.tif", frames, photometric="minisblack")
    tifffile.imwrite(root / "recording.tif", frames[:4], photometric="minisblack")
    return root


def test_the_readme_example_gives_what_the_commands_give(demo, monkeypatch):
    monkeypatch.chdir(demo)
    ns: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), ns)

    # evaluate: the command tunes and scores the same, to the bit.
    cli("evaluate", "--detector", "trackpy", "--data", "data", "--datasets", "test_d075", "--out", "cli-eval", "-q")
    by_cli = json.loads((demo / "cli-eval" / "metrics.json").read_text())
    metrics = ns["metrics"]
    assert metrics == json.loads((demo / "runs" / "trackpy" / "metrics.json").read_text())
    for key in ("detector", "threshold", "params", "datasets", "by_target"):
        assert metrics[key] == by_cli[key], key
    assert set(metrics["datasets"]["test_d075"]["auc"]) == {"70", "140", "210"}
    assert (demo / "runs" / "trackpy" / "trackpy.json").read_text() == (demo / "cli-eval" / "trackpy.json").read_text()

    # predict: the table the command writes, byte for byte.
    model = ns["model"]
    cli("predict", model, "recording.tif", "--out", "cli.csv", "--pixel-size-um", "0.07", "-q")
    found = ns["found"]
    assert found.table.to_csv(index=False) == (demo / "cli.csv").read_text()
    assert list(found.table.columns) == ["frame", "t_s", "x", "y", "score", "sigma", "x_um", "y_um", "sigma_um"]
    assert len(found.table) and found.description == "4 frame(s) of 40 x 40 px"
    assert found.timing.source == "the seed paper's defaults"

    # track: the four files the command writes, the same bytes (the picture: a PNG).
    cli("track", model, "movie.tif", "--out", "cli-tracks", "--max-diffusion-um2-s", "1.0", "-q")
    for name in ("tracks.csv", "diffusion.csv", "track.json"):
        assert (demo / "tracks" / name).read_text() == (demo / "cli-tracks" / name).read_text(), name
    assert (demo / "tracks" / "tracks.png").read_bytes()[:4] == b"\x89PNG"
    run = ns["run"]
    assert run.tracks.to_csv(index=False) == (demo / "tracks" / "tracks.csv").read_text()
    assert run.settings == json.loads((demo / "tracks" / "track.json").read_text())
    assert run.settings["max_diffusion_um2_s"] == 1.0 and run.settings["model"] == model
    # Two bright particles through 12 frames: two long tracks, D finite, > 0 and of the
    # right size (true D 0.1 um^2/s).
    long = run.diffusion[run.diffusion.n_frames >= 10]
    assert len(long) >= 2, run.diffusion
    assert np.isfinite(long[["D_um2_s", "D_low_um2_s", "D_high_um2_s"]]).all().all()
    assert ((long.D_um2_s > 0.01) & (long.D_um2_s < 0.5)).all(), long

    # The loaded detector on frames in memory: predict's table is its candidates above
    # the tuned threshold.
    det = ns["det"]
    assert det.threshold == json.loads((demo / "runs" / "trackpy" / "trackpy.json").read_text())["threshold"]
    table = det.detect(tifffile.imread("recording.tif"))
    kept = table[table.score >= det.threshold].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, found.table[list(kept.columns)].reset_index(drop=True))


def test_the_notes_a_command_prints_come_from_the_library(demo, monkeypatch):
    """`report` receives the lines `factory predict` and `factory track` print to stderr."""
    from models import predict_file, track_file

    monkeypatch.chdir(demo)
    notes: list[str] = []
    found = predict_file("trackpy", "recording.tif", dwell_us=3.0, progress=False, report=notes.append,
                         given_by="the command line")
    r = cli("predict", "trackpy", "recording.tif", "--out", "notes.csv", "--dwell-us", "3")
    assert notes == ["scan timing: dwell 3 us, line retrace 1.1 ms, frame flyback 1.1 ms, unidirectional (from "
                     "the command line (dwell_us) and the seed paper's defaults)"]
    assert notes[0] in r.stderr.splitlines()
    assert found.timing.dwell_us == 3.0
    notes.clear()
    before = sorted(demo.rglob("*"))
    run = track_file("trackpy", "movie.tif", progress=False, report=notes.append, given_by="the command line",
                     max_diffusion_um2_s=0.2)
    assert sorted(demo.rglob("*")) == before  # without `out`, nothing is written
    r = cli("track", "trackpy", "movie.tif", "--out", "notes-tracks", "--max-diffusion-um2-s", "0.2")
    assert len(notes) == 1 and notes[0] in r.stderr.splitlines() and "up to 0.2 um^2/s" in notes[0]
    assert r.stdout.strip() == f"notes-tracks: {run.summary()}"


def test_bad_input_raises_the_commands_line(demo, monkeypatch):
    from factory.errors import FactoryError
    from models import evaluate_stores, predict_file, track_file

    monkeypatch.chdir(demo)
    with pytest.raises(FactoryError, match=r"--dwell-us -1.0: a dwell time must be"):
        predict_file("trackpy", "recording.tif", dwell_us=-1.0)
    with pytest.raises(FactoryError, match="--linker magic: unknown"):
        track_file("trackpy", "movie.tif", linker="magic")
    with pytest.raises(FactoryError, match="tracking needs a movie"):
        tifffile.imwrite(demo / "one.tif", np.zeros((32, 32), np.uint16))
        track_file("trackpy", "one.tif")
    with pytest.raises(FactoryError, match="exactly one of"):
        evaluate_stores("data", "nowhere")
    assert not (demo / "nowhere").exists()


def test_the_packages_list_their_api_and_load_it_on_first_use():
    code = ("import sys, models, factory\n"
            "heavy = ('torch', 'trackpy', 'numba', 'h5py', 'matplotlib', 'pandas', 'importlib.metadata')\n"
            "print(*[m for m in heavy if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""  # nothing heavy at import time
    import factory
    import models

    for pkg in (models, factory):
        for name in pkg.__all__:
            module, attr = (pkg._API[name], name) if pkg is models else pkg._API.get(name, (None, None))
            if module is None:  # __version__
                assert re.match(r"\d+\.\d+", getattr(pkg, name))
                continue
            assert getattr(pkg, name) is getattr(import_module(module), attr), name
            assert name in dir(pkg)
    with pytest.raises(AttributeError):
        models.no_such_name  # noqa: B018
    # A name that is also a module of the package keeps meaning the module.
    assert factory.build.__name__ == "factory.build" and callable(factory.build_stores)


def test_the_commands_choices_are_the_librarys():
    """The command line spells its choices out (the library's modules are too slow to
    import for `--help`); they stay the library's."""
    from cli.main import Estimator, Target
    from loaders.datasets import TARGETS
    from models.tracking.tracks import ESTIMATORS

    assert [e.value for e in Estimator] == list(ESTIMATORS)
    assert [t.value for t in Target] == list(TARGETS)
