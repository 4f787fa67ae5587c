"""Recordings read a chunk of frames at a time: the frames read chunk by chunk are the
frames read whole (a memory-mapped TIFF, a TIFF decoded page by page, a .npy file, a
store); a detector run chunk by chunk gives the table of one call on every frame, and
`factory predict` and `track` the outputs of one chunk; bad pixels anywhere are refused
before any work, a file that breaks half-way leaves nothing; reading takes the memory of
a chunk, not of the recording; and a command imports only what it needs."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

import models.recordings.recording as recording
from conftest import ROOT, invoke_cli, one_line_error, run_cli
from factory.errors import FactoryError
from models.recordings.predict import localise
from models.recordings.recording import open_recording
from models.tracking.timing import ScanTiming
from models.detectors.trackpy import PAPER, TrackPyDetector
from models.tracking.tracks import track_recording

H = W = 32


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 frames of 32 x 32 px: a 10 frame movie is read in 4."""
    monkeypatch.setattr(recording, "CHUNK_BYTES", 3 * H * W * 4)


def movie_frames(n=10, seed=0):
    """``n`` frames of Poisson background with two bright spots walking."""
    rng = np.random.default_rng(seed)
    frames = rng.poisson(8.0, (n, H, W)).astype(np.uint16)
    for t in range(n):
        frames[t, 8 + t % 14:11 + t % 14, 8:11] += 60
        frames[t, 20:23, 6 + t % 20:9 + t % 20] += 50
    return frames


WRITERS = {  # name: (writer, how the frames are read)
    "plain.tif": (lambda p, a: tifffile.imwrite(p, a, photometric="minisblack"), "memmap"),
    "zlib.tif": (lambda p, a: tifffile.imwrite(p, a, photometric="minisblack", compression="zlib"), "pages"),
    "tiled.tif": (lambda p, a: tifffile.imwrite(p, a, photometric="minisblack", tile=(16, 16)), "pages"),
    "bigendian.tif": (lambda p, a: tifffile.imwrite(p, a.astype(np.float32), byteorder=">",
                                                    photometric="minisblack"), "memmap"),
    "movie.npy": (lambda p, a: np.save(p, a), "memmap"),
    "perframe.tif": (lambda p, a: _frame_by_frame(p, a), "pages"),  # a series per frame: its pages are the frames
}


def _frame_by_frame(path, frames):
    with tifffile.TiffWriter(path) as w:
        for f in frames:
            w.write(f, photometric="minisblack")


@pytest.mark.parametrize("name", list(WRITERS))
def test_frames_read_chunk_by_chunk_are_the_frames_read_whole(tmp_path, small_chunks, name):
    write, kind = WRITERS[name]
    frames = movie_frames()
    write(tmp_path / name, frames)
    with open_recording(tmp_path / name) as rec:
        assert rec.kind == kind and rec.shape == frames.shape
        starts, chunks = zip(*rec.chunks())
        assert starts == (0, 3, 6, 9) and all(c.dtype == np.float32 for c in chunks)
        assert np.array_equal(np.concatenate(chunks), frames.astype(np.float32))
        assert np.array_equal(rec.frames(4, 7), frames[4:7].astype(np.float32))
        assert np.allclose(rec.mean_frame(5), frames[:5].mean(0), rtol=1e-12)
        # A network's batches of 2 frames never straddle two chunks.
        assert [len(c) for _, c in rec.chunks(step=2)] == [2, 2, 2, 2, 2]
        assert np.array_equal(rec.read(), frames.astype(np.float32))


def test_one_image_is_a_recording_of_one_frame(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", movie_frames(1)[0])
    with open_recording(tmp_path / "one.tif") as rec:
        assert rec.shape == (1, H, W) and np.array_equal(rec.read()[0], movie_frames(1)[0])


@pytest.fixture(scope="module")
def movie_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    cfg = root / "m.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 8, "datasets": {"test_m": {
        "n_movies": 2, "movie": {"n_frames": 12, "margin_um": 0.0},
        "image": {"height_px": H, "width_px": W},
        "particles": {"count": {"type": "fixed", "n": 2}, "diffusion_um2_s": 0.1, "n_qd": 60.0},
        "output": {"chunk_images": 64}}}}))
    assert run_cli("build", cfg, "--out", root, "-q").returncode == 0
    return root / "test_m.h5"


def test_a_store_is_read_chunk_by_chunk(movie_store, small_chunks):
    from factory.stores import Store

    with Store(movie_store) as st:
        whole = st.read("images")
    with open_recording(movie_store) as rec:
        assert rec.kind == "store" and rec.shape == whole.shape == (24, H, W)
        starts, chunks = zip(*rec.chunks())
        assert starts == tuple(range(0, 24, 3))
        assert np.array_equal(np.concatenate(chunks), whole.astype(np.float32))
        assert np.allclose(rec.mean_frame(12), whole[:12].mean(0), rtol=1e-12)


# --- detectors over chunks ---------------------------------------------------------------


def _spotnet_in_batches_of_two():
    """An untrained SpotNet that runs 2 frames of 32 x 32 px per forward pass."""
    import torch

    from models.detectors.registry import NetDetector, family, parse_params

    torch.manual_seed(0)
    fam = dataclasses.replace(family("spotnet"), pixels_per_batch=2 * H * W)
    det = NetDetector(fam, fam.build(parse_params("spotnet", {"widths": [4, 8]})), min_score=0.0)
    assert det.batch_frames(H, W) == 2
    return det


@pytest.mark.parametrize("calls_per_chunk", [1, 2], ids=["a call per chunk", "chunks of 6 in calls of 4 and 2"])
@pytest.mark.parametrize("make", [lambda: TrackPyDetector(PAPER), _spotnet_in_batches_of_two],
                         ids=["trackpy", "spotnet"])
def test_a_detector_run_chunk_by_chunk_gives_the_table_of_one_call(tmp_path, small_chunks, monkeypatch, make,
                                                                   calls_per_chunk):
    import models.recordings.predict as predict

    det = make()
    if calls_per_chunk == 2:
        monkeypatch.setattr(recording, "CHUNK_BYTES", 6 * H * W * 4)
        monkeypatch.setattr(predict, "DETECT_PIXELS", 4 * H * W)
        calls = []
        detect = det.detect
        monkeypatch.setattr(det, "detect", lambda images, progress=False, min_score=None:
                            calls.append(len(images)) or detect(images, min_score=min_score))
    frames = movie_frames(11)
    tifffile.imwrite(tmp_path / "m.tif", frames, photometric="minisblack")
    whole = det.detect(frames.astype(np.float32))
    assert len(whole) and whole["frame"].nunique() == 11
    with open_recording(tmp_path / "m.tif") as rec:
        chunked = localise(det, rec)
        pd.testing.assert_frame_equal(chunked, whole, check_exact=True)
        # Scores below a cut dropped as they come: the rows of the whole table above it.
        cut = float(np.median(whole["score"]))
        above = whole[whole["score"] >= cut].reset_index(drop=True)
        pd.testing.assert_frame_equal(localise(det, rec, min_score=cut), above, check_exact=True)
        nothing = localise(det, rec, min_score=np.inf)
        assert len(nothing) == 0 and list(nothing.columns) == list(whole.columns)
    if calls_per_chunk == 2:  # 11 frames: chunks of 6 and 5, each in calls of up to 4
        assert calls[1:5] == [4, 2, 4, 1]  # after the one call on all 11


def test_a_network_decodes_only_the_peaks_that_can_pass_the_cut():
    """detect(min_score=c) decodes the peaks whose probability p is from c on (p bounds
    the score p (1 - exp(-1 / (2 sigma^2))) from above), so it keeps every row scored
    from c on and decodes fewer; localise passes its cut down."""
    import torch

    from models.detectors.registry import NetDetector, family

    class ImageAsHeat(torch.nn.Module):
        """A SpotNet stand-in whose heat logit is the image itself, (counts - 20) / 3: every
        local maximum is a peak, with a probability that varies (an untrained network's
        are all alike).  Offsets 0; sigma grows with the counts too, so the score ranks
        the peaks otherwise than p does."""

        flip_tta = False

        def forward(self, x, head=0):
            zero = torch.zeros_like(x)
            return torch.cat([(x - 20.0) / 3.0, zero, zero, (x - 20.0) / 8.0], 1)

    det = NetDetector(family("spotnet"), ImageAsHeat(), min_score=0.0)
    frames = movie_frames(6).astype(np.float32)
    whole = det.detect(frames)  # every local maximum
    cut = float(np.quantile(whole["score"], 0.9))
    part = det.detect(frames, min_score=cut)
    prob = lambda t: t["score"] / (1 - np.exp(-1 / (2 * t["sigma"] ** 2)))  # noqa: E731
    assert (prob(part) >= cut * (1 - 1e-6)).all() and len(part) == (prob(whole) >= cut).sum() < len(whole)
    above = lambda t: t[t["score"] >= cut].reset_index(drop=True)  # noqa: E731
    assert len(above(whole)) < len(part)  # rows below the cut too: p passed it
    pd.testing.assert_frame_equal(above(part), above(whole), check_exact=True)
    pd.testing.assert_frame_equal(localise(det, frames, min_score=cut), above(whole), check_exact=True)


def _as_sets(tracks: pd.DataFrame) -> set:
    """The tracks as sets of (frame, x, y): TrackPy numbers tracks in no fixed order."""
    return {frozenset(zip(g["frame"], g["x"], g["y"])) for _, g in tracks.groupby("track")}


def test_tracking_a_recording_in_chunks_gives_the_tracks_of_the_whole_array(tmp_path, small_chunks):
    frames = movie_frames(12)
    tifffile.imwrite(tmp_path / "m.tif", frames, photometric="minisblack", compression="zlib")
    det, timing = TrackPyDetector(PAPER), ScanTiming()
    ref, ref_d, ref_used = track_recording(det, frames.astype(np.float32), timing, 0.07, 0.2)
    with open_recording(tmp_path / "m.tif") as rec:
        tracks, d, used = track_recording(det, rec, timing, 0.07, 0.2)
    assert used == ref_used and len(tracks) == len(ref) and _as_sets(tracks) == _as_sets(ref)
    key = ["n_frames", "D_um2_s", "D_low_um2_s", "D_high_um2_s", "sigma_loc_um"]
    pd.testing.assert_frame_equal(d[key].sort_values(key).reset_index(drop=True),
                                  ref_d[key].sort_values(key).reset_index(drop=True), check_exact=True)


def test_predict_and_track_write_the_same_outputs_in_chunks_as_in_one(tmp_path, monkeypatch):
    frames = movie_frames(12)
    tifffile.imwrite(tmp_path / "m.tif", frames, photometric="minisblack")
    runs = {}
    for name, chunk in (("one", recording.CHUNK_BYTES), ("many", 3 * H * W * 4)):
        monkeypatch.setattr(recording, "CHUNK_BYTES", chunk)
        r = invoke_cli("predict", "trackpy", tmp_path / "m.tif", "--out", tmp_path / f"{name}.csv",
                       "--pixel-size-um", "0.1", "-q")
        assert r.returncode == 0, r.stderr
        r = invoke_cli("track", "trackpy", tmp_path / "m.tif", "--out", tmp_path / name, "--max-diffusion-um2-s", "0.2",
                       "-q")
        assert r.returncode == 0, r.stderr
        runs[name] = pd.read_csv(tmp_path / name / "tracks.csv")
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "many.csv").read_bytes()
    assert _as_sets(runs["one"]) == _as_sets(runs["many"])
    assert (tmp_path / "one" / "track.json").read_text() == (tmp_path / "many" / "track.json").read_text()


def test_the_progress_bar_counts_frames(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", movie_frames(3), photometric="minisblack")
    r = run_cli("predict", "trackpy", tmp_path / "m.tif", "--out", tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr
    assert "3/3" in r.stderr and "frame/s" in r.stderr
    r = run_cli("predict", "trackpy", tmp_path / "m.tif", "--out", tmp_path / "q.csv", "-q")
    assert r.returncode == 0 and "frame/s" not in r.stderr


# --- bad input, found before the work or half-way ----------------------------------------------




def left_behind(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "m.tif")


# --- one channel of a recording of several ---------------------------------------------------

CHANNEL_WRITERS = {  # name: (writer of a (T, C, H, W) array, how the frames are read)
    "imagej.tif": (lambda p, a: tifffile.imwrite(p, a, imagej=True, metadata={"axes": "TCYX"}), "memmap"),
    "tczlib.tif": (lambda p, a: tifffile.imwrite(p, a, photometric="minisblack", compression="zlib",
                                                 metadata={"axes": "TCYX"}), "pages"),
    "ct.tif": (lambda p, a: tifffile.imwrite(p, a.transpose(1, 0, 2, 3).copy(), photometric="minisblack",
                                             metadata={"axes": "CTYX"}), "memmap"),
    "ctzlib.tif": (lambda p, a: tifffile.imwrite(p, a.transpose(1, 0, 2, 3).copy(), photometric="minisblack",
                                                 compression="zlib", metadata={"axes": "CTYX"}), "pages"),
    "movie.ome.tif": (lambda p, a: tifffile.imwrite(p, a, photometric="minisblack", metadata={"axes": "TCYX"}),
                      "memmap"),
}


def three_channels(n=10):
    """(T, 3, H, W): the walking spots in channel 1, other frames in channels 0 and 2."""
    return np.stack([movie_frames(n, seed=5), movie_frames(n), movie_frames(n, seed=7)[::-1]], axis=1)


@pytest.mark.parametrize("name", CHANNEL_WRITERS)
def test_one_channel_of_several_reads_as_that_channel_alone(tmp_path, small_chunks, name):
    """Each channel, chunk by chunk (3 frames: a map or page list per chunk, strided over the
    channels where frames interleave them), is the array's own slice."""
    write, kind = CHANNEL_WRITERS[name]
    movie = three_channels()
    write(tmp_path / name, movie)
    for c in range(3):
        with open_recording(tmp_path / name, channel=c) as rec:
            assert rec.kind == kind and rec.shape == (10, H, W)
            read = np.concatenate([chunk for _, chunk in rec.chunks()])
            np.testing.assert_array_equal(read, movie[:, c])
            np.testing.assert_array_equal(rec.frames(4, 9), movie[4:9, c])
    assert recording.tiff_channels(tmp_path / name) == 3


def test_the_commands_read_the_channel_asked_for(tmp_path):
    """`factory predict` and `track` on channel 1 of a 3-channel movie write what they write
    for that channel saved alone; without --channel, or with one the file lacks, one line."""
    movie = three_channels(12)
    tifffile.imwrite(tmp_path / "three.tif", movie, imagej=True, metadata={"axes": "TCYX"})
    tifffile.imwrite(tmp_path / "one.tif", movie[:, 1], photometric="minisblack")
    for src, extra in (("three.tif", ["--channel", "1"]), ("one.tif", [])):
        stem = Path(src).stem
        assert run_cli("predict", "trackpy", tmp_path / src, "--out", tmp_path / f"{stem}.csv", "-q",
                       *extra).returncode == 0
        assert run_cli("track", "trackpy", tmp_path / src, "--out", tmp_path / f"t{stem}", "-q",
                       *extra).returncode == 0
    assert (tmp_path / "three.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert (tmp_path / "tthree" / "tracks.csv").read_bytes() == (tmp_path / "tone" / "tracks.csv").read_bytes()
    assert len(pd.read_csv(tmp_path / "one.csv")) > 0 and len(pd.read_csv(tmp_path / "tone" / "tracks.csv")) > 0
    for args, needles in ((["track"], ["holds 3 channels (axes TCYX)", "--channel (0 to 2)"]),
                          (["predict", "--channel", "3"], ["--channel 3", "channels 0 to 2"])):
        out = tmp_path / ("refused" if args[0] == "track" else "refused.csv")
        one_line_error(run_cli(args[0], "trackpy", tmp_path / "three.tif", "--out", out, *args[1:]), *needles)
        assert not out.exists()
    one_line_error(run_cli("predict", "trackpy", tmp_path / "one.tif", "--out", tmp_path / "p.csv", "--channel", "1"),
                   "one.tif: --channel 1: it holds one channel")
    one_line_error(run_cli("calibrate", tmp_path / "three.tif", "--out", tmp_path / "cal", "--pixel-size-um", "0.07",
                           "--dwell-us", "2", "--line-retrace-ms", "1.1"), "holds 3 channels")
    assert not (tmp_path / "cal").exists()
    # Channel 0 of a file of one channel is that channel.
    assert run_cli("predict", "trackpy", tmp_path / "one.tif", "--out", tmp_path / "zero.csv", "-q",
                   "--channel", "0").returncode == 0
    assert (tmp_path / "zero.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    with pytest.raises(FactoryError, match="give a channel number from 0"):
        open_recording(tmp_path / "three.tif", channel=-1)


@pytest.mark.parametrize("bad,needle", [(np.nan, "1 NaN pixel value(s)"), (np.inf, "1 infinite pixel value(s)"),
                                        (1e300, "pixel values up to 1e+300 do not fit in 32-bit floats")])
def test_a_bad_pixel_in_the_last_frame_is_refused_before_any_work(tmp_path, small_chunks, bad, needle):
    frames = movie_frames(12).astype(np.float64)
    frames[11, 5, 7] = bad
    tifffile.imwrite(tmp_path / "m.tif", frames, photometric="minisblack")
    # Found by a streamed pass when the recording is opened, with the message a whole read gives.
    with pytest.raises(FactoryError, match=re.escape(needle)):
        open_recording(tmp_path / "m.tif")
    one_line_error(invoke_cli("track", "trackpy", tmp_path / "m.tif", "--out", tmp_path / "t"), needle)
    one_line_error(invoke_cli("predict", "trackpy", tmp_path / "m.tif", "--out", tmp_path / "p.csv"), needle)
    assert left_behind(tmp_path) == []


def test_a_file_that_breaks_half_way_leaves_nothing_written(tmp_path, small_chunks):
    tifffile.imwrite(tmp_path / "m.tif", movie_frames(12), photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(tmp_path / "m.tif") as tf:
        last = tf.pages[-1].dataoffsets[0]
    with open(tmp_path / "m.tif", "r+b") as f:  # the last frame's data garbled (a file cut short is refused at opening)
        f.seek(last)
        f.write(b"\xff" * 16)
    with open_recording(tmp_path / "m.tif") as rec:
        assert rec.kind == "pages" and len(rec.frames(0, 3)) == 3  # the first chunks read
    one_line_error(invoke_cli("track", "trackpy", tmp_path / "m.tif", "--out", tmp_path / "t", "-q"),
                   "m.tif: cannot read")
    one_line_error(invoke_cli("predict", "trackpy", tmp_path / "m.tif", "--out", tmp_path / "p.csv", "-q"),
                   "m.tif: cannot read")
    assert left_behind(tmp_path) == []


# --- memory and imports (subprocesses: a fresh interpreter each) ------------------------------


MEMORY = """
import json, resource, sys, tracemalloc
import numpy as np
from models.recordings.recording import CHUNK_BYTES, open_recording

def rss_mb():
    # The peak resident memory of this interpreter (ru_maxrss would count the pytest
    # process this one was forked from).
    try:
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

out = {}
for path in sys.argv[1:]:
    before = rss_mb()
    tracemalloc.start()
    total = 0.0
    with open_recording(path) as rec:
        for _, chunk in rec.chunks():
            total += float(chunk[:, 0, 0].sum())
        kind, shape = rec.kind, rec.shape
    out[kind] = {"peak_mb": tracemalloc.get_traced_memory()[1] / 2**20, "rss_growth_mb": rss_mb() - before,
                 "float_mb": np.prod(shape) * 4 / 2**20, "total": total}
    tracemalloc.stop()
out["chunk_mb"] = CHUNK_BYTES / 2**20
print(json.dumps(out))
"""


def _write_frames(path, n, h, w, **kw):
    def frames():
        for t in range(n):
            yield np.full((h, w), t % 1000, np.uint16)

    tifffile.imwrite(path, frames(), shape=(n, h, w), dtype=np.uint16, photometric="minisblack", **kw)


def test_reading_a_recording_takes_the_memory_of_a_chunk_not_of_the_recording(tmp_path):
    """A 210 MB uint16 TIFF (420 MB as float32), memory-mapped, and a 105 MB one decoded
    page by page: Python's peak allocations stay at about two chunks, and the resident
    memory grows by far less than the recording."""
    _write_frames(tmp_path / "big.tif", 1600, 256, 256)
    _write_frames(tmp_path / "zlib.tif", 800, 256, 256, compression="zlib")
    r = subprocess.run([sys.executable, "-c", MEMORY, tmp_path / "big.tif", tmp_path / "zlib.tif"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["memmap"]["total"] == sum(t % 1000 for t in range(1600))
    for kind in ("memmap", "pages"):
        assert m[kind]["float_mb"] >= 400 if kind == "memmap" else m[kind]["float_mb"] >= 200
        assert m[kind]["peak_mb"] < 3 * m["chunk_mb"] < m[kind]["float_mb"] / 2, m
        assert m[kind]["rss_growth_mb"] < m[kind]["float_mb"] / 2, m


# main() ends the process itself; what it registered with atexit still runs (cli.main._leave).
IMPORTS = """
import atexit, sys
from cli.main import main
heavy = ("torch", "torchvision", "trackpy", "numba", "matplotlib", "factory.kernel", "factory.psf")
atexit.register(lambda: print("imported:", *(m for m in heavy if m in sys.modules)))
sys.argv = ["factory", *sys.argv[1:]]
main()
"""


def _imports(*args) -> set[str]:
    r = subprocess.run([sys.executable, "-c", IMPORTS, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.splitlines()[-1].split()[1:])


def test_a_command_imports_only_what_it_needs(tmp_path):
    """TrackPy needs no torch; a network's tracks need no trackpy (nor its Numba
    linker); tracks.png needs no matplotlib; a SpotNet never loads torchvision (Keypoint
    R-CNN's); nothing loads the simulator's compiled kernels."""
    import torch

    from models.training.config import parse_train_config
    from models.detectors.registry import family, parse_params
    from models.training.runs import RunFolder

    tifffile.imwrite(tmp_path / "m.tif", movie_frames(3), photometric="minisblack")
    assert _imports("predict", "trackpy", tmp_path / "m.tif", "--out", tmp_path / "p.csv", "-q") == {"trackpy", "numba"}
    assert _imports("track", "trackpy", tmp_path / "m.tif", "--out", tmp_path / "t", "-q") == {"trackpy", "numba"}
    run = RunFolder(tmp_path / "run")
    run.create()
    params = {"widths": [4, 8]}
    run.write_config(parse_train_config({"model": "spotnet", "model_params": params}))
    torch.manual_seed(0)
    run.save_best(family("spotnet").build(parse_params("spotnet", params)), 0)
    assert _imports("predict", run.path, tmp_path / "m.tif", "--out", tmp_path / "n.csv", "-q") == {"torch"}
    assert _imports("track", run.path, tmp_path / "m.tif", "--out", tmp_path / "n", "-q", "--pixel-size-um", "0.07") == {"torch"}


def test_the_registry_still_lists_every_family():
    from models.detectors.registry import DETECTORS_2D, FAMILIES, NETWORKS, family

    assert list(FAMILIES) == [*NETWORKS, "trackpy"] and "dmdetnet3d" not in DETECTORS_2D
    assert all(family(n).name == n for n in FAMILIES)
    with pytest.raises(FactoryError, match="unknown detector"):
        family("nonet")
