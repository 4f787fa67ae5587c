"""Bad input and outputs that never lie: duplicate YAML keys, physical flags outside the
schema's limits, outputs checked before any work and written whole or not at all, and
messages that say what is true.  Every refusal is one line on stderr, a non-zero exit,
no traceback and nothing left behind.

The commands run in this interpreter (conftest's run_cli); no model is trained: TrackPy
needs none, and the run folders here hold untrained networks or broken weight files."""

import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from conftest import one_line_error, run_cli

MIB = 2**20


def leftovers(folder: Path) -> list[str]:
    """Staging folders or probe files a command left behind."""
    return [p.name for p in Path(folder).rglob(".*") if "partial" in p.name or "factory-write-test" in p.name]


@pytest.fixture
def movie(tmp_path):
    """A 6-frame T x H x W TIFF with one bright spot moving down."""
    rng = np.random.default_rng(0)
    frames = rng.poisson(8.4, (6, 32, 32)).astype(np.uint16)
    for t in range(6):
        frames[t, 10 + t:13 + t, 10:13] += 60
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, frames, photometric="minisblack")
    return path


def read_only_folder(tmp_path: Path) -> Path:
    """A folder nothing can be written into: a chmod 555 one, or (as root, which ignores
    permissions) a read-only system folder."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for d in (ro, Path("/sys"), Path("/proc/sys")):
        try:
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError:
            return d
    pytest.skip("no read-only folder here (root, and no read-only mount)")


# --- 5. silent wrong results ---------------------------------------------------------------


def test_a_key_written_twice_in_a_datasets_yaml_is_refused_naming_file_key_and_lines(tmp_path):
    cfg = tmp_path / "d.yaml"
    cfg.write_text("seed: 1\n"
                   "datasets:\n"
                   "  train:\n"
                   "    n_images: 64\n"
                   "    image: {pixel_size_um: 0.07}\n"
                   "    n_images: 640\n")
    r = run_cli("build", cfg, "--out", tmp_path / "data", "-q")
    one_line_error(r, "d.yaml", "datasets.train.n_images: duplicate key", "lines 4 and 6")
    assert not (tmp_path / "data").exists()
    cfg.write_text("seed: 1\ndatasets: {a: {n_images: 5}}\nseed: 2\n")
    one_line_error(run_cli("build", cfg, "--out", tmp_path / "data"), "d.yaml", "seed: duplicate key", "lines 1 and 3")
    # Anchors and aliases are no duplicates; the same key in two mappings neither.
    cfg.write_text("seed: 1\ndefaults: &d {image: {pixel_size_um: 0.07}}\n"
                   "datasets: {a: {n_images: 5, image: {pixel_size_um: 0.07}}, b: {n_images: 5}}\n")
    from factory.config import load_config, parse_yaml
    from factory.errors import ConfigError

    assert set(load_config(cfg).datasets) == {"a", "b"}
    # Keys are compared as the mapping holds them: 1 and 1.0 are one key.
    with pytest.raises(ConfigError, match=r"f.yaml: n.1: duplicate key \(2 times on line 1\)"):
        parse_yaml("n: {1: a, 1.0: b}\n", "f.yaml")


def test_a_key_written_twice_in_a_training_config_is_refused(tmp_path):
    recipe = tmp_path / "t.yaml"
    recipe.write_text("model: spotnet\nepochs: 1\nlr: 0.01\nepochs: 50\n")
    r = run_cli("train", "--config", recipe, "--data", tmp_path / "nowhere", "--out", tmp_path / "run", "-q")
    one_line_error(r, "t.yaml", "epochs: duplicate key", "lines 2 and 4")
    assert not (tmp_path / "run").exists()


def _limit(path: str, attr: str):
    """A limit of a config field, read from the schema (never a copy of the number)."""
    from factory.inspect_store import config_field

    field = config_field(path)
    return next(getattr(m, attr) for m in field.metadata if getattr(m, attr, None) is not None)


@pytest.mark.parametrize("command", ["predict", "track"])
@pytest.mark.parametrize("flag,value,field", [
    ("--pixel-size-um", "inf", "image.pixel_size_um"),
    ("--pixel-size-um", "1e9", "image.pixel_size_um"),
    ("--pixel-size-um", "nan", "image.pixel_size_um"),
    ("--dwell-us", "inf", "scan.dwell_us"),
    ("--line-retrace-ms", "1e12", "scan.line_retrace_ms"),
])
def test_physical_flags_must_be_finite_and_inside_the_schemas_limits(movie, tmp_path, command, flag, value, field):
    out = tmp_path / ("p.csv" if command == "predict" else "t")
    r = run_cli(command, "trackpy", movie, "--out", out, flag, value, "-q")
    line = one_line_error(r, f"{flag} {float(value)}", field)
    if field == "image.pixel_size_um":
        assert f"<= {_limit(field, 'le')} um" in line  # the schema's own upper limit
    assert not out.exists() and not leftovers(tmp_path)


def test_z_step_and_linking_flags_must_be_finite(movie, tmp_path):
    one_line_error(run_cli("predict", "trackpy", movie, "--out", tmp_path / "p.csv", "--z-step-um", "inf"),
                   "--z-step-um inf", "stack.z_step_um")
    for flag in ("--max-diffusion-um2-s", "--search-range-um"):
        one_line_error(run_cli("track", "trackpy", movie, "--out", tmp_path / "t", flag, "inf"), f"{flag} inf", "finite")
    one_line_error(run_cli("evaluate", "--predictions", tmp_path / "x.csv", "--data", tmp_path, "--out", tmp_path / "e",
                       "--gates-nm", "70,inf"), "--gates-nm 70,inf", "finite")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "t").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("flags", [("--search-range-um", "1e308"), ("--max-diffusion-um2-s", "1e308"),
                                   ("--pixel-size-um", "1e-300")])
def test_finite_flags_that_give_no_usable_linking_radius_are_refused_before_the_work(movie, tmp_path, flags):
    one_line_error(run_cli("track", "trackpy", movie, "--out", tmp_path / "t", "-q", *flags), "the linking radius",
                   "give physical values")
    assert not (tmp_path / "t").exists() and not leftovers(tmp_path)


def test_the_schema_limits_a_pixel_size_in_a_config_too(tmp_path):
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 1, "datasets": {"a": {"n_images": 5, "image": {"pixel_size_um": 1e9}}}}))
    one_line_error(run_cli("build", cfg, "--out", tmp_path / "data"), "d.yaml", "datasets.a.image.pixel_size_um")


def test_a_sane_flag_still_passes(movie, tmp_path):
    r = run_cli("track", "trackpy", movie, "--out", tmp_path / "t", "--pixel-size-um", "0.1", "-q")
    assert r.returncode == 0, r.stderr
    assert '"pixel_size_um": 0.1' in (tmp_path / "t" / "track.json").read_text()


# --- 6. outputs checked first, written whole -------------------------------------------------


def test_predict_never_overwrites_a_csv_without_overwrite(movie, tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("an earlier run\n")
    one_line_error(run_cli("predict", "trackpy", movie, "--out", out, "-q"), "p.csv: already exists", "--overwrite")
    assert out.read_text() == "an earlier run\n"
    r = run_cli("predict", "trackpy", movie, "--out", out, "-q", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("frame,t_s,x,y,score") and not leftovers(tmp_path)
    # A folder where the CSV should go, and a file where a folder should be.
    (tmp_path / "d.csv").mkdir()
    one_line_error(run_cli("predict", "trackpy", movie, "--out", tmp_path / "d.csv"), "d.csv: is a folder")
    one_line_error(run_cli("predict", "trackpy", movie, "--out", movie / "p.csv"), "movie.tif is a file, not a folder")
    # A CSV in folders that do not exist yet: created, and only on success.
    r = run_cli("predict", "trackpy", movie, "--out", tmp_path / "new" / "sub" / "p.csv", "-q")
    assert r.returncode == 0 and (tmp_path / "new" / "sub" / "p.csv").exists()


def test_outputs_are_checked_before_any_work(movie, tmp_path):
    """The output is refused before the model (here: missing) or the input is read."""
    (tmp_path / "p.csv").write_text("x\n")
    one_line_error(run_cli("predict", tmp_path / "no-model", movie, "--out", tmp_path / "p.csv"), "already exists")
    one_line_error(run_cli("track", tmp_path / "no-model", movie, "--out", tmp_path / "p.csv"),
                   "p.csv: is a file, not a folder")
    one_line_error(run_cli("evaluate", "--model", tmp_path / "no-model", "--data", tmp_path / "nowhere",
                       "--out", tmp_path / "p.csv"), "p.csv: is a file, not a folder")
    (tmp_path / "shot.png").write_bytes(b"an earlier picture")
    one_line_error(run_cli("preview", tmp_path / "no-store.h5", "--out", tmp_path / "shot.png"),
                   "shot.png: already exists", "--overwrite")
    assert (tmp_path / "shot.png").read_bytes() == b"an earlier picture"
    one_line_error(run_cli("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "p.csv"),
                   "p.csv: is a file, not a folder")
    assert (tmp_path / "p.csv").read_text() == "x\n" and not leftovers(tmp_path)


def test_a_read_only_place_is_refused_before_the_work(movie, tmp_path):
    ro = read_only_folder(tmp_path)
    one_line_error(run_cli("predict", "trackpy", movie, "--out", ro / "p.csv", "-q"), "cannot write there")
    one_line_error(run_cli("track", "trackpy", movie, "--out", ro / "t", "-q"), "cannot write there")
    one_line_error(run_cli("evaluate", "--detector", "trackpy", "--data", tmp_path / "nowhere", "--out", ro / "e"),
                   "cannot write there")
    one_line_error(run_cli("preview", tmp_path / "no-store.h5", "--out", ro / "p.png"), "cannot write there")


def test_track_keeps_an_earlier_run_unless_overwrite_and_leaves_nothing_half_written(movie, tmp_path):
    out = tmp_path / "t"
    assert run_cli("track", "trackpy", movie, "--out", out, "-q").returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(first) == {"tracks.csv", "diffusion.csv", "tracks.png", "track.json"}
    one_line_error(run_cli("track", "trackpy", movie, "--out", out, "-q", "--memory", "2"),
                   "t: holds an earlier run", "tracks.csv", "--overwrite")
    # A run that fails half-way (a 3 x 3 px movie) leaves the earlier run as it was.
    np.save(tmp_path / "tiny.npy", np.zeros((4, 3, 3)))
    tifffile.imwrite(tmp_path / "tiny.tif", np.zeros((4, 3, 3), np.uint16), photometric="minisblack")
    one_line_error(run_cli("track", "trackpy", tmp_path / "tiny.tif", "--out", out, "--overwrite", "-q"), "too small")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first and not leftovers(tmp_path)
    r = run_cli("track", "trackpy", movie, "--out", out, "-q", "--memory", "2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert '"memory": 2' in (out / "track.json").read_text() and not leftovers(tmp_path)
    # A failing first run creates no folder at all.
    one_line_error(run_cli("track", "trackpy", tmp_path / "tiny.tif", "--out", tmp_path / "never", "-q"), "too small")
    assert not (tmp_path / "never").exists() and not leftovers(tmp_path)


def test_a_folder_where_an_output_file_goes_stops_the_run_before_anything_moves(movie, tmp_path):
    out = tmp_path / "t"
    (out / "tracks.png").mkdir(parents=True)
    one_line_error(run_cli("track", "trackpy", movie, "--out", out, "-q"), "tracks.png: is a folder")
    assert [p.name for p in out.iterdir()] == ["tracks.png"] and not leftovers(tmp_path)


def test_a_write_that_fails_half_way_is_one_line_and_leaves_nothing(movie, tmp_path):
    # A real write failure: the process may not write files beyond 4 KiB (RLIMIT_FSIZE,
    # as a quota or a full disk would stop it), so the CSV fails half-written.
    import resource
    import signal
    import subprocess
    import sys

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = subprocess.run([sys.executable, "-m", "cli", "predict", "trackpy", str(movie), "--out", str(tmp_path / "p.csv"),
                        "--all", "-q"], capture_output=True, text=True, preexec_fn=small_files, timeout=600,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "NUMBA_CACHE_DIR": str(tmp_path / "nb")})
    one_line_error(r, "p.csv: cannot write", "too large")
    assert not (tmp_path / "p.csv").exists() and not leftovers(tmp_path)


def test_sigterm_ends_a_command_in_one_line_leaving_nothing(tmp_path):
    # SLURM sends SIGTERM at a job's time limit: the command stops as after Ctrl-C, in one
    # line, its staging folder removed.
    import signal
    import subprocess
    import sys
    import time

    # 3000 frames: about 10 s of TrackPy here, so the signal comes while it works.
    tifffile.imwrite(tmp_path / "long.tif", np.random.default_rng(0).poisson(8.0, (3000, 64, 64)).astype(np.uint16),
                     photometric="minisblack")
    p = subprocess.Popen([sys.executable, "-m", "cli", "track", "trackpy", str(tmp_path / "long.tif"), "--out",
                          str(tmp_path / "t"), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    assert p.poll() is None, "the command ended before the signal"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err and [ln for ln in err.splitlines() if ln.strip()] == ["error: terminated (SIGTERM)"]
    assert not leftovers(tmp_path) and not (tmp_path / "t").exists()


def test_a_worker_forked_by_a_command_ends_on_sigterm_as_any_process():
    # trackpy.batch's pool forks workers and stops them with SIGTERM: a worker that ran
    # the command's handler (one line, SystemExit) could leave a lock it shares with the
    # command taken, and the command waited for it forever.  A forked worker dies of the
    # signal, silently; the command itself keeps its handler.
    import signal
    import subprocess
    import sys

    code = ("import multiprocessing as mp, signal, sys, time\n"
            "from cli.main import _terminated, handle_sigterm\n"
            "handle_sigterm()\n"
            "p = mp.get_context('fork').Process(target=time.sleep, args=(60,))\n"
            "p.start(); time.sleep(0.5); p.terminate(); p.join(30)\n"
            "print(p.exitcode, signal.getsignal(signal.SIGTERM) is _terminated)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(-signal.SIGTERM), "True"] and r.stderr == ""


def test_evaluate_keeps_an_earlier_evaluation_unless_overwrite(tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    one_line_error(run_cli("evaluate", "--detector", "trackpy", "--data", tmp_path / "nowhere", "--out", out),
                   "e: holds an earlier run (metrics.json)", "--overwrite")
    assert (out / "metrics.json").read_text() == "{}" and not leftovers(tmp_path)


def test_train_overwrite_removes_the_earlier_model_only_once_the_new_run_can_start(tmp_path):
    from models.training.config import parse_train_config
    from models.training.runs import RunFolder

    run = RunFolder(tmp_path / "run")
    run.create()
    run.write_config(parse_train_config({"model": "spotnet"}))
    run.file(run.BEST).write_bytes(b"the earlier model")
    r = run_cli("train", "--data", tmp_path / "nowhere", "--out", run.path, "--overwrite", "-q")
    one_line_error(r, "nowhere: no such data folder")
    assert run.file(run.BEST).read_bytes() == b"the earlier model"


def test_report_needs_a_runs_folder_it_can_write(tmp_path):
    one_line_error(run_cli("report", tmp_path / "nowhere", "--data", tmp_path), "nowhere: no such folder")
    assert not (tmp_path / "nowhere").exists()


# --- 8. messages that say what is true --------------------------------------------------------


def test_small_frames_are_not_called_a_colour_image(tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((5, 3, 3), np.float32))
    one_line_error(run_cli("predict", "trackpy", tmp_path / "small.npy", "--out", tmp_path / "p.csv"),
                   "3 x 3 px are too small", absent=["colour"])
    np.save(tmp_path / "rgb.npy", np.zeros((32, 32, 3), np.uint8))
    one_line_error(run_cli("predict", "trackpy", tmp_path / "rgb.npy", "--out", tmp_path / "p.csv"), "colour image")
    assert not (tmp_path / "p.csv").exists()


def test_an_empty_movie_is_not_called_one_frame(tmp_path):
    with pytest.warns(UserWarning):  # tifffile: a zero-size array makes a nonconformant TIFF
        tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 32, 32), np.uint16), photometric="minisblack")
    one_line_error(run_cli("track", "trackpy", tmp_path / "empty.tif", "--out", tmp_path / "t"), "holds no images",
                   absent=["one frame"])
    np.save(tmp_path / "empty.npy", np.zeros((0, 32, 32), np.float32))
    one_line_error(run_cli("predict", "trackpy", tmp_path / "empty.npy", "--out", tmp_path / "p.csv"), "holds no images")
    assert not (tmp_path / "t").exists() and not (tmp_path / "p.csv").exists()


def test_a_hyperstack_is_refused_by_its_shape_and_never_read(tmp_path):
    """A T x Z x H x W TIFF is refused naming its shape, before a pixel is read: with its
    compressed pixel data overwritten (a file whose pixels cannot be decoded) it gives
    the same one line."""
    tifffile.imwrite(tmp_path / "h.tif", np.zeros((3, 4, 16, 16), np.uint16), photometric="minisblack", compression="zlib")
    for command, out in (("track", tmp_path / "t"), ("predict", tmp_path / "p.csv")):
        one_line_error(run_cli(command, "trackpy", tmp_path / "h.tif", "--out", out), "h.tif",
                       "expected one image (H x W) or a stack (T x H x W), got shape (3, 4, 16, 16)")
        assert not out.exists()
    data = bytearray((tmp_path / "h.tif").read_bytes())
    with tifffile.TiffFile(tmp_path / "h.tif") as t:
        for page in t.pages:
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                data[offset:offset + count] = b"\xff" * count
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    with tifffile.TiffFile(tmp_path / "bad.tif") as t, pytest.raises(zlib.error):
        t.asarray()  # the pixels cannot be decoded
    one_line_error(run_cli("track", "trackpy", tmp_path / "bad.tif", "--out", tmp_path / "t2"), "bad.tif",
                   "got shape (3, 4, 16, 16)")


def test_several_movies_in_one_tiff_and_colour_samples_are_refused(tmp_path):
    # Two series of frames (an OME file of two positions): which is the movie is the
    # user's to say; a planar RGB image's samples are not frames.
    with tifffile.TiffWriter(tmp_path / "two.ome.tif", ome=True) as w:
        w.write(np.zeros((6, 16, 16), np.uint16))
        w.write(np.zeros((5, 16, 16), np.uint16))
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 16, 16), np.uint8), photometric="rgb", planarconfig="separate")
    for name, words in (("two.ome.tif", ["holds 2 image series (6x16x16, 5x16x16)", "one movie"]),
                        ("rgb.tif", ["colour samples of one image", "SYX"])):
        for command, out in (("track", tmp_path / "t"), ("predict", tmp_path / "p.csv")):
            one_line_error(run_cli(command, "trackpy", tmp_path / name, "--out", out), name, *words)
            assert not out.exists()


def test_huge_pixels_are_not_called_nan(tmp_path):
    np.save(tmp_path / "huge.npy", np.full((2, 16, 16), 1e300))
    one_line_error(run_cli("predict", "trackpy", tmp_path / "huge.npy", "--out", tmp_path / "p.csv"),
                   "1e+300", "32-bit", absent=["NaN"])
    a = np.zeros((2, 16, 16))
    a[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", a)
    one_line_error(run_cli("predict", "trackpy", tmp_path / "nan.npy", "--out", tmp_path / "p.csv"), "1 NaN pixel",
                   absent=["infinite"])


def _run_folder(path: Path, model: str = "spotnet", params: dict | None = None):
    from models.training.config import parse_train_config
    from models.training.runs import RunFolder

    run = RunFolder(path)
    run.create()
    run.write_config(parse_train_config({"model": model, "model_params": params or {"widths": [4, 8]}}))
    return run


class _RunsACommand:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_messages_say_what_the_file_is_and_never_advise_unsafe_loading(movie, tmp_path):
    import torch

    run = _run_folder(tmp_path / "run")
    run.file(run.BEST).write_bytes(np.random.default_rng(1).bytes(4096))
    line = one_line_error(run_cli("predict", run.path, movie, "--out", tmp_path / "p.csv", "-q"),
                          "best.pt: not a PyTorch weights file", absent=["plain weights", "weights_only"])
    assert "corrupt" in line
    marker = tmp_path / "pwned"
    torch.save({"model": _RunsACommand(marker)}, run.file(run.BEST))
    line = one_line_error(run_cli("predict", run.path, movie, "--out", tmp_path / "p.csv", "-q"),
                          "best.pt: not a plain weights file", "refused because it holds pickled Python objects",
                          "nothing in it was run", absent=["weights_only", "Re-running", "False"])
    assert line.rstrip().endswith("was run")
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_track_checks_the_recording_before_it_reads_the_model(tmp_path):
    """A bad recording is told at once, not after the model (and PyTorch) are loaded: with
    a model folder that does not exist, the message is still the recording's."""
    tifffile.imwrite(tmp_path / "thin.tif", np.zeros((3, 4, 64), np.uint16), photometric="minisblack")
    one_line_error(run_cli("track", tmp_path / "no-model", tmp_path / "thin.tif", "--out", tmp_path / "t"),
                   "thin.tif", "4 x 64 px are too small", absent=["no-model"])
    assert not (tmp_path / "t").exists()


def test_track_with_a_3d_model_says_it_is_a_stack_model(movie, tmp_path):
    from models.detectors.registry import family, parse_params

    params = {"widths": [4, 8], "pixel_size_um": 0.07, "z_step_um": 0.5}
    run = _run_folder(tmp_path / "run3d", "dmdetnet3d", params)
    run.save_best(family("dmdetnet3d").build(parse_params("dmdetnet3d", params)), 0)
    one_line_error(run_cli("track", run.path, movie, "--out", tmp_path / "t", "-q"),
                   "a 3D model", "z-stacks", "2D movie", absent=["(N, Z, H, W)"])
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("name,ok", [(".", False), ("..", False), ("_a", False), ("a/b", False), ("a\n", False),
                                     ("a.b", True), ("0_x-y", True)])
def test_the_dataset_name_rule_and_its_message_agree(tmp_path, name, ok):
    from factory.config import NAME_RULE, parse_config
    from factory.errors import ConfigError

    raw = {"seed": 1, "datasets": {name: {"n_images": 1}}}
    if ok:
        assert name in parse_config(raw).datasets
        return
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "d.yaml")
    msg = str(e.value)
    assert msg.startswith("d.yaml: datasets: ") and NAME_RULE in msg
    assert "starts with a letter or digit" in NAME_RULE  # why '.' and '..' are refused


def _option_names():
    import typer.main

    from cli.main import app

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        yield name, [o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]


def test_help_keeps_every_option_name_whole_at_80_columns():
    for name, opts in _option_names():
        r = run_cli(name, "--help", env={"COLUMNS": "80"})
        assert r.returncode == 0, r.stdout
        for opt in opts:
            assert opt in r.stdout, (name, opt)
        assert "…" not in r.stdout and max(map(len, r.stdout.splitlines())) <= 80, r.stdout
    listing = run_cli("--help", env={"COLUMNS": "80"}).stdout.split("Commands:")[1]
    assert "..." not in listing and "…" not in listing  # each command's first sentence whole
    r = run_cli("predict", "--help", env={"COLUMNS": "80"})
    assert "--line-retrace-ms" in r.stdout and "--frame-flyback-ms" in r.stdout


def test_schema_lists_every_size_field():
    r = run_cli("schema")
    assert r.returncode == 0
    sizes = {ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("n_")}
    assert sizes == {"n_images", "n_movies", "n_stacks"}
    assert "pixel_size_um" in r.stdout and "starts with a letter or digit" in r.stdout


def test_train_model_offers_every_network(tmp_path):
    from models.detectors.registry import NETWORKS

    from cli.main import Network

    assert [n.value for n in Network] == list(NETWORKS)
    r = run_cli("train", "--help", env={"COLUMNS": "80"})
    for name in NETWORKS:
        assert name in r.stdout, name
    r = run_cli("train", "--model", "dmdetnet3d", "--data", tmp_path / "nowhere", "--out", tmp_path / "run")
    one_line_error(r, "nowhere: no such data folder")  # the choice is accepted
    assert not (tmp_path / "run").exists()


def test_a_damaged_tiff_is_refused_not_read_short(tmp_path):
    """A TIFF cut short (a copy that stopped) or with a corrupt header: tifffile logs the
    bad page offset and reads the pages before it (a 20-frame compressed movie came back
    as one image); here it is refused in one line, by both commands, and nothing is
    written."""
    frames = np.random.default_rng(0).poisson(10, (20, 32, 32)).astype(np.uint16)
    for name, kw in (("plain", {}), ("zlib", {"compression": "zlib"}), ("imagej", {"imagej": True})):
        whole = tmp_path / f"{name}.tif"
        tifffile.imwrite(whole, frames, **({"photometric": "minisblack"} | kw) if name != "imagej" else kw)
        data = whole.read_bytes()
        for cut in (len(data) // 2, len(data) - 100):
            short = tmp_path / f"{name}-{cut}.tif"
            short.write_bytes(data[:cut])
            for cmd, out in (("track", tmp_path / "t"), ("predict", tmp_path / "p.csv")):
                one_line_error(run_cli(cmd, "trackpy", short, "--out", out), str(short), "damaged TIFF")
                assert not out.exists()
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00" + b"\xff" * 60)  # a TIFF header pointing nowhere
    one_line_error(run_cli("predict", "trackpy", junk, "--out", tmp_path / "p.csv"), "damaged TIFF",
                   "invalid offset")
    # The same frames whole are read in full.
    assert run_cli("predict", "trackpy", tmp_path / "zlib.tif", "--out", tmp_path / "p.csv").returncode == 0
    assert "20 frame(s)" in run_cli("predict", "trackpy", tmp_path / "zlib.tif", "--out", tmp_path / "p.csv",
                                    "--overwrite").stdout

