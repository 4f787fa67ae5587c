"""Linking and `factory track` end to end on tiny movies, scored against the truth, and
bad input."""

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from conftest import one_line_error, run_cli
from models.tracking.tracks import link, match_to_truth, score_tracks, search_range_px


def test_search_range_follows_d_and_the_frame_period():
    # 4 sqrt(2 D dt) / px + 2 px of localisation error.
    assert search_range_px(1.0, 0.08, 0.1) == pytest.approx(4 * np.sqrt(0.16) / 0.1 + 2)
    assert search_range_px(0.25, 0.08, 0.1) < search_range_px(1.0, 0.08, 0.1)


def test_link_and_score_two_crossing_free_walks_by_hand():
    """Two particles far apart, one spurious detection: links within each particle are
    correct, the spurious detection is counted apart, D truth comes per track."""
    rng = np.random.default_rng(0)
    F = 8
    truth = np.zeros((F, 2, 2))
    truth[:, 0] = np.c_[10 + np.cumsum(rng.normal(0, 0.5, F)), 10 + np.cumsum(rng.normal(0, 0.5, F))]
    truth[:, 1] = np.c_[40 + np.cumsum(rng.normal(0, 0.5, F)), 40 + np.cumsum(rng.normal(0, 0.5, F))]
    rows = [(f, truth[f, p, 0] + 0.1, truth[f, p, 1], 1.0, 0.08 * f) for f in range(F) for p in range(2)]
    rows.append((3, 80.0, 5.0, 0.5, 0.24))  # nothing there
    table = pd.DataFrame(rows, columns=["frame", "x", "y", "score", "t_s"])
    tracks = link(table, radius_px=5.0, memory=0)
    assert tracks["track"].nunique() == 3
    slots = match_to_truth(tracks, truth, gate_px=1.0, pixel_size_um=0.07)
    assert (slots == -1).sum() == 1
    counts, est = score_tracks(tracks, truth, np.array([0.3, 0.6]), 1.0, 0.07, 0.0)
    assert counts == {"links": 14, "matched_links": 14, "correct_links": 14}
    assert sorted(est["true_D_um2_s"]) == [0.3, 0.6]


def test_a_track_gets_a_true_d_only_when_most_of_its_points_follow_one_particle():
    # Ten points: one on particle 0 and nine on nothing has no true D; seven of ten on
    # particle 1 (three on nothing) has particle 1's; five and five on the two has none.
    F = 10
    truth = np.zeros((F, 2, 2))
    truth[:, 0] = [10.0, 10.0]
    truth[:, 1] = [40.0, 40.0]
    diffusion = np.array([0.3, 0.6])

    def true_d(on):  # on[f]: the particle point f sits on, or -1 (60 px away from both)
        xy = [truth[f, p] if p >= 0 else (100.0, 100.0) for f, p in enumerate(on)]
        t = pd.DataFrame({"frame": np.arange(F), "x": [a for a, _ in xy], "y": [b for _, b in xy],
                          "t_s": 0.1 * np.arange(F), "track": 0})
        return score_tracks(t, truth, diffusion, 1.0, 0.07, 0.0)[1]["true_D_um2_s"].iloc[0]

    assert np.isnan(true_d([0] + [-1] * 9))
    assert true_d([1] * 7 + [-1] * 3) == 0.6
    assert np.isnan(true_d([0] * 5 + [1] * 5))


@pytest.fixture(scope="module")
def movie(tmp_path_factory):
    root = tmp_path_factory.mktemp("track")
    cfg = root / "m.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 8, "datasets": {"test_m": {
        "n_movies": 2, "movie": {"n_frames": 12, "margin_um": 0.0},
        "image": {"height_px": 32, "width_px": 32},
        "particles": {"count": {"type": "fixed", "n": 2}, "diffusion_um2_s": 0.1, "n_qd": 60.0},
        "output": {"chunk_images": 64}},
        "images": {"n_images": 4, "image": {"height_px": 32, "width_px": 32}}}}))
    assert run_cli("build", cfg, "--out", root, "-q").returncode == 0
    from factory.stores import Store

    with Store(root / "test_m.h5") as st:
        tifffile.imwrite(root / "movie.tif", st.read("images", 0, 12), photometric="minisblack")
    return root


def test_factory_track_on_a_tiff_and_on_a_store(movie, tmp_path):
    r = run_cli("track", "trackpy", movie / "movie.tif", "--out", tmp_path / "t", "--max-diffusion-um2-s", "0.2")
    assert r.returncode == 0, r.stderr
    assert "scan timing: dwell 2 us" in r.stderr and "seed paper's defaults" in r.stderr
    tracks = pd.read_csv(tmp_path / "t" / "tracks.csv")
    assert list(tracks.columns) == ["frame", "t_s", "x", "y", "score", "sigma", "track", "x_um", "y_um"]
    d = pd.read_csv(tmp_path / "t" / "diffusion.csv")
    assert list(d.columns) == ["track", "n_frames", "D_um2_s", "D_low_um2_s", "D_high_um2_s", "sigma_loc_um"]
    # Two bright particles over 12 frames: two long tracks whose D is of the right size.
    long = d[d.n_frames >= 10]
    assert len(long) >= 2 and ((long.D_um2_s > 0.01) & (long.D_um2_s < 0.5)).all(), d
    assert (tmp_path / "t" / "tracks.png").read_bytes()[:4] == b"\x89PNG"
    used = json.loads((tmp_path / "t" / "track.json").read_text())
    period = 32 * 32 * 2e-6 + 31 * 1.1e-3 + 1.1e-3
    assert used["frame_period_s"] == pytest.approx(period)
    # The adaptive linker by default: no track reaches past the radius for the largest D.
    reach = 4 * (2 * 0.2 * period) ** 0.5 / used["pixel_size_um"] + 2
    assert used["linker"] == "adaptive" and used["own_radius_px"][1] == pytest.approx(reach)
    assert used["own_radius_px"][0] <= used["search_range_px"] <= used["own_radius_px"][1]
    # Time stamps: frame start + scan time at the localisation (TrackPy sees what the laser saw).
    row = tracks.iloc[0]
    assert row.t_s == pytest.approx(row.frame * period + row.y * (32 * 2e-6 + 1.1e-3) + row.x * 2e-6)
    r = run_cli("track", "trackpy", movie / "test_m.h5", "--out", tmp_path / "s", "-q", "--estimator", "msd")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s" / "track.json").read_text())["estimator"] == "msd"
    st = pd.read_csv(tmp_path / "s" / "tracks.csv")
    assert set(st.movie) == {0, 1} and st.groupby("movie").frame.min().tolist() == [0, 12]
    # Two passes: a small first radius, then fragments joined by their own D, never
    # across two movies of a store.
    r = run_cli("track", "trackpy", movie / "test_m.h5", "--out", tmp_path / "j", "-q", "--linker", "stitch",
                "--min-diffusion-um2-s", "0.01", "--max-diffusion-um2-s", "0.2")
    assert r.returncode == 0, r.stderr
    used = json.loads((tmp_path / "j" / "track.json").read_text())
    assert used["linker"] == "stitch" and used["stitch_max_diffusion_um2_s"] == 0.2 and used["own_radius_px"] is None
    sj = pd.read_csv(tmp_path / "j" / "tracks.csv")
    assert (sj.groupby("track")["movie"].nunique() == 1).all() and len(sj) == len(st)


def test_bad_input_to_track_is_one_line(movie, tmp_path):
    bad = one_line_error

    tifffile.imwrite(tmp_path / "one.tif", np.zeros((32, 32), np.uint16))
    bad(run_cli("track", "trackpy", tmp_path / "one.tif", "--out", tmp_path / "o"), "tracking needs a movie")
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as w:
        w.write(np.zeros((32, 32), np.uint16), photometric="minisblack")
        w.write(np.zeros((40, 32), np.uint16), photometric="minisblack")
    bad(run_cli("track", "trackpy", tmp_path / "mixed.tif", "--out", tmp_path / "o"), "frames of different sizes")
    bad(run_cli("track", "trackpy", movie / "movie.tif", "--out", tmp_path / "o", "--frame-flyback-ms", "-2"),
        "--frame-flyback-ms -2.0: a time must be >= 0")
    bad(run_cli("track", "trackpy", movie / "movie.tif", "--out", tmp_path / "o", "--linker", "magic"),
        "--linker magic: unknown")
    bad(run_cli("track", "trackpy", movie / "images.h5", "--out", tmp_path / "o"), "images.h5: holds images, not movies")
    assert not (tmp_path / "o").exists()


def _walk(rng, n, d_um2_s, dt, px, start):
    return np.asarray(start) + np.cumsum(rng.normal(0, np.sqrt(2 * d_um2_s * dt) / px, (n, 2)), 0)


def test_stitch_joins_a_fast_particles_fragments_by_its_own_d_and_leaves_a_slow_neighbour_alone():
    """A fast particle (D 0.5 um^2/s, 0.1 um px, 0.4 s frames: 6.3 px per axis per frame)
    cut into fragments of 6 frames with one frame lost between them, beside a slow one
    (D 0.01) whose track stops where the fast one passes.  Stitching by each fragment's
    own D rejoins the fast particle's fragments, and no fast fragment is hung on the slow
    track: the slow particle's reach (4 sigma of a 0.9 px step) is far shorter."""
    from models.tracking.tracks import stitch

    rng = np.random.default_rng(4)
    px, dt = 0.1, 0.4
    fast = _walk(rng, 36, 0.5, dt, px, (100.0, 100.0))
    slow = _walk(rng, 12, 0.01, dt, px, fast[13] + (12.0, 0.0))  # 12 px from where the fast one is at frame 13
    rows = []
    for k, a in enumerate(range(0, 36, 7)):  # fragments 0-5, 7-12, ... (frame 6, 13, ... lost)
        f = np.arange(a, min(a + 6, 36))
        rows.append(pd.DataFrame({"frame": f, "t_s": f * dt, "x": fast[f, 0], "y": fast[f, 1], "track": k}))
    f = np.arange(2, 14)
    rows.append(pd.DataFrame({"frame": f, "t_s": f * dt, "x": slow[:, 0], "y": slow[:, 1], "track": 99}))
    joined = stitch(pd.concat(rows, ignore_index=True), px, dt, d_prior_um2_s=0.5, localisation_px=0.5)
    by_track = joined.groupby("track")["frame"].apply(list)
    assert sorted(map(len, by_track)) == [12, 31]  # the slow track, and the fast particle's 31 points in one
    fast_track = joined[joined["frame"].isin([0, 35]) & (joined["x"].isin(fast[:, 0]))]["track"].unique()
    assert len(fast_track) == 1
    # The same fragments linked with the slow particle's D as the prior and no D of their
    # own (one point each): nothing is within its reach, nothing is joined.
    singles = pd.DataFrame({"frame": [0, 2, 4], "t_s": [0, 2 * dt, 4 * dt], "x": fast[[0, 2, 4], 0],
                            "y": fast[[0, 2, 4], 1], "track": [0, 1, 2]})
    assert stitch(singles, px, dt, d_prior_um2_s=0.0001, localisation_px=0.5)["track"].nunique() == 3


def test_a_track_is_cut_where_one_step_is_improbable_for_its_own_mobility():
    """A slow particle (D 0.01 um^2/s: 0.9 px per axis per 0.4 s frame at 0.1 um px)
    whose track jumps once to a neighbour 15 px away (17 sd of its step) is cut there;
    a gap of three frames with its longer step is not a jump; a fast particle's track
    (6.3 px per axis per frame) is left whole, and so is a track too short to judge."""
    from models.tracking.tracks import SPLIT_P, split_improbable_steps

    rng = np.random.default_rng(5)
    px, dt = 0.1, 0.4
    slow = _walk(rng, 30, 0.01, dt, px, (50.0, 50.0))
    slow[15:] += (15.0, 0.0)  # from frame 15 on it is the neighbour
    frames = np.r_[0:10, 13:33]  # frames 10-12 lost: a step over 4 frame periods
    fast = _walk(rng, 30, 0.5, dt, px, (150.0, 150.0))
    short = _walk(rng, 4, 0.01, dt, px, (20.0, 20.0)) + np.r_[0, 0, 15, 15][:, None]
    rows = [pd.DataFrame({"frame": frames, "t_s": frames * dt, "x": slow[:, 0], "y": slow[:, 1], "track": 7}),
            pd.DataFrame({"frame": np.arange(30), "t_s": np.arange(30) * dt, "x": fast[:, 0], "y": fast[:, 1],
                          "track": 3}),
            pd.DataFrame({"frame": np.arange(4), "t_s": np.arange(4) * dt, "x": short[:, 0], "y": short[:, 1],
                          "track": 9})]
    out = split_improbable_steps(pd.concat(rows, ignore_index=True))
    pieces = out.groupby("track")["frame"].apply(lambda f: (int(f.min()), int(f.max()), len(f))).tolist()
    # Renumbered 0.. in the order of the old ids: fast (3), slow (7) in two, short (9).
    assert pieces == [(0, 29, 30), (0, 17, 15), (18, 32, 15), (0, 3, 4)], pieces
    # Without the jump nothing is cut: the gap's step is within its own (4x longer) reach.
    rows[0][["x", "y"]] = _walk(np.random.default_rng(6), 30, 0.01, dt, px, (50.0, 50.0))
    assert split_improbable_steps(pd.concat(rows, ignore_index=True))["track"].nunique() == 3
    assert 0 < SPLIT_P < 0.01


def test_the_cut_leaves_a_standing_track_alone_and_keeps_movies_apart():
    """A track that mostly stands still (median step 0) has no scale to judge a step by
    and is not cut; ids that repeat across movies are two tracks, never interleaved."""
    from models.tracking.tracks import link_diffusion, split_improbable_steps

    still = pd.DataFrame({"frame": np.arange(8), "t_s": np.arange(8) * 0.4, "track": 0,
                          "x": [0, 0, 0, 0, 0, 0.1, 0.1, 0.1], "y": 0.0})
    assert split_improbable_steps(still)["track"].nunique() == 1
    rng = np.random.default_rng(8)
    two = pd.concat([pd.DataFrame({"movie": m, "frame": np.arange(10), "t_s": np.arange(10) * 0.4, "track": 5,
                                   "x": _walk(rng, 10, 0.05, 0.4, 0.1, (50.0 + 100 * m, 50.0))[:, 0], "y": 50.0})
                     for m in (0, 1)], ignore_index=True)
    out = split_improbable_steps(two)
    assert out.groupby("track")["movie"].nunique().eq(1).all() and out["track"].nunique() == 2
    # The radius's D: the middle of the range, never below a sixteenth of the largest.
    assert link_diffusion(0.02, 0.5) == pytest.approx(0.1)
    assert link_diffusion(0.0, 0.5) == link_diffusion(1e-6, 0.5) == pytest.approx(0.5 / 16)


def test_the_tracks_picture_draws_each_track_where_it_is_in_its_colour(tmp_path):
    """A 20 x 30 px mean image (a bright pixel at (25, 15)), track 0 along y = 2 from x = 2
    to 17 and track 1 down x = 5: enlarged 20x (600 px / 30 px), below an 18 px title."""
    from PIL import Image

    from models.tracking.tracks import TRACK_COLOURS, plot_tracks

    mean = np.zeros((20, 30))
    mean[15, 25] = 9.0
    tracks = pd.DataFrame({"track": [0, 0, 1, 1], "frame": [0, 1, 0, 1], "x": [2.0, 17.0, 5.0, 5.0],
                           "y": [2.0, 2.0, 8.0, 16.0]})
    plot_tracks(mean, tracks, tmp_path / "t.png", "title")
    img = np.asarray(Image.open(tmp_path / "t.png").convert("RGB"))
    k, band = 20, 18
    assert img.shape == (20 * k + band, 30 * k, 3)
    at = lambda x, y: tuple(img[int((y + 0.5) * k) + band, int((x + 0.5) * k)])  # noqa: E731
    assert at(10, 2) == TRACK_COLOURS[0] and at(5, 12) == TRACK_COLOURS[1]
    assert at(25, 15) == (255, 255, 255) and at(25, 5) == (0, 0, 0)  # the mean image, min to max
    assert (img[:band] == 255).mean() > 0.9  # the title's band: white, a little text


def test_track_takes_the_pixel_size_a_tiff_records_unless_given(tmp_path):
    # OME's PhysicalSizeX (um, or another length unit) and ImageJ's resolution in microns
    # are the specimen's pixel size; a resolution in inches (72 dpi) says nothing of it,
    # and the model's training data then gives it.  A flag overrides the file.
    from factory.config import DatasetSpec

    frames = np.random.default_rng(0).poisson(8.4, (6, 32, 32)).astype(np.uint16)
    for t in range(6):
        frames[t, 10 + t:13 + t, 10:13] += 60
    files = {"ome.ome.tif": dict(ome=True, metadata={"axes": "TYX", "PhysicalSizeX": 0.14, "PhysicalSizeY": 0.14}),
             "ome_nm.ome.tif": dict(ome=True, metadata={"axes": "TYX", "PhysicalSizeX": 140, "PhysicalSizeXUnit": "nm"}),
             "ij.tif": dict(imagej=True, resolution=(1 / 0.2, 1 / 0.2), metadata={"axes": "TYX", "unit": "um"}),
             "dpi.tif": dict(resolution=(72, 72))}
    expect = {"ome.ome.tif": 0.14, "ome_nm.ome.tif": 0.14, "ij.tif": 0.2, "dpi.tif": DatasetSpec().image.pixel_size_um}
    for name, kw in files.items():
        tifffile.imwrite(tmp_path / name, frames, **kw)
        r = run_cli("track", "trackpy", tmp_path / name, "--out", tmp_path / name.split(".")[0], "-q")
        assert r.returncode == 0, r.stderr
        got = json.loads((tmp_path / name.split(".")[0] / "track.json").read_text())["pixel_size_um"]
        assert got == pytest.approx(expect[name]), name
    r = run_cli("track", "trackpy", tmp_path / "ome.ome.tif", "--out", tmp_path / "flag", "-q", "--pixel-size-um", "0.1")
    assert r.returncode == 0 and json.loads((tmp_path / "flag" / "track.json").read_text())["pixel_size_um"] == 0.1

