"""Movies: physical laws of the new arrays, on both engines (kernel and NumPy).

Each expectation is written here from the physics (Eq. 1 by hand, the SPEC's scan
timing), not from the simulator's own helpers."""

import numpy as np
import pytest

from conftest import dataset

PX, SXY, SZ, NBKG = 0.07, 0.21, 1.36, 8.4
DWELL, RETRACE = 2e-6, 1.1e-3


def eq1_signal(dx_px, dy_px, dz_um=0.0, nqd=10.0):
    return (nqd / (2 * np.pi * SXY**2) * np.exp(-((dx_px * PX) ** 2 + (dy_px * PX) ** 2) / (2 * SXY**2))
            / (np.sqrt(2 * np.pi) * SZ) * np.exp(-dz_um**2 / (2 * SZ**2)))


def hand_pixel_times(h, w, bidirectional):
    """Start of each pixel's dwell: r (W dwell + retrace) + c dwell, odd lines reversed."""
    r, c = np.mgrid[0:h, 0:w]
    k = np.where((r % 2 == 1) & bidirectional, w - 1 - c, c)
    return r * (w * DWELL + RETRACE) + k * DWELL


def movie(engine, n_movies, n_frames, **sections):
    return engine(None, n_movies=n_movies, movie={"n_frames": n_frames, **sections.pop("movie", {})}, **sections)


@pytest.mark.parametrize("direction", ["unidirectional", "bidirectional"])
def test_a_fixed_particles_exposure_time_is_the_scan_time_of_its_pixel(engine, direction):
    """D = 0: the exposure-weighted position is the particle's, and its time is the
    Eq. 1-weighted mean of the pixels' scan times.  Unidirectional: that is the scan time
    of the particle's own pixel.  Bidirectional: the line part is the pixel's; within a
    line the reversed neighbouring lines pull it toward the mirrored column (by at most
    (W - 1) / 2 dwells)."""
    bidi = direction == "bidirectional"
    # Far from the edges (4 sigma), so the field does not cut the PSF off on one side;
    # off-centre in x for the bidirectional scan, where the reversed lines matter.
    x0, y0, F = (6.0 if bidi else 12.0), 11.0, 3
    out = movie(engine, 2, F, scan={"direction": direction},
                particles={"diffusion_um2_s": 0.0, "xy_start": {"type": "fixed", "x_px": x0, "y_px": y0}})
    times = hand_pixel_times(24, 25, bidi)
    r, c = np.mgrid[0:24, 0:25]
    w = eq1_signal(c - x0, r - y0)
    expect = (w * times).sum() / w.sum()
    period = 24 * 25 * DWELL + 23 * RETRACE + RETRACE  # flyback defaults to one retrace
    np.testing.assert_allclose(out["frame_start_s"], np.tile(np.arange(F) * period, 2), rtol=1e-12)
    np.testing.assert_allclose(out["exposure_t_s"][:, 0] - out["frame_start_s"], expect, rtol=1e-9)
    np.testing.assert_allclose(out["exposure_xy"][:, 0], [[x0, y0]] * 6, atol=1e-5)
    pixel = y0 * (25 * DWELL + RETRACE) + x0 * DWELL
    if not bidi:
        assert abs(expect - pixel) < 0.5 * DWELL  # near-symmetric weights: its pixel's own time
        assert abs(out["exposure_t_s"][0, 0] - pixel) < 0.5 * DWELL
    else:
        assert abs(expect - pixel) < 12 * DWELL and abs(expect - pixel) > DWELL


def test_the_walk_is_continuous_across_frames_with_msd_2dt_including_the_flyback(engine):
    D, flyback = 1.0, 5.0
    out = movie(engine, 400, 2, movie={"frame_flyback_ms": flyback, "margin_um": 50.0},
                particles={"diffusion_um2_s": D}, image={"height_px": 8, "width_px": 10})
    tr = out["trajectories"][:, 0].astype(np.float64).reshape(400, 2, 80, 3)
    d = tr[:, 1, 0] - tr[:, 0, -1]  # first step of frame 2 minus last step of frame 1
    d[:, :2] *= PX
    dt = DWELL + flyback * 1e-3
    for axis in range(3):
        ratio = (d[:, axis] ** 2).mean() / (2 * D * dt)
        assert abs(ratio - 1) < 5 * np.sqrt(2 / len(d)), (axis, ratio)
    period = 80 * DWELL + 7 * RETRACE + flyback * 1e-3
    assert out["frame_start_s"][1] == pytest.approx(period, rel=1e-12)


def test_particles_outside_the_field_light_the_edge_pixels_by_eq1(engine):
    x0, y0 = -2.0, 10.0  # two pixels left of the first column
    out = movie(engine, 1, 2, movie={"margin_um": 1.0},
                particles={"diffusion_um2_s": 0.0, "xy_start": {"type": "fixed", "x_px": x0, "y_px": y0}})
    r, c = np.mgrid[0:24, 0:25]
    truth = eq1_signal(c - x0, r - y0) + NBKG
    np.testing.assert_allclose(out["expected"], np.broadcast_to(truth, (2, 24, 25)), rtol=1e-5)
    assert out["expected"][:, 10, 0].min() > NBKG + 6  # the edge pixel really is lit
    assert (out["in_view"][:, 0] == 0).all() and np.allclose(out["centroids"][:, 0, 0], x0)


def test_the_in_view_flag_matches_the_centroid_and_particles_enter_and_leave(engine):
    out = movie(engine, 40, 6, movie={"margin_um": 0.5}, image={"height_px": 16, "width_px": 16},
                particles={"diffusion_um2_s": 1.5, "count": {"type": "fixed", "n": 4}})
    c = out["centroids"].astype(np.float64)
    inside = (c[..., 0] >= -0.5) & (c[..., 0] < 15.5) & (c[..., 1] >= -0.5) & (c[..., 1] < 15.5)
    np.testing.assert_array_equal(out["in_view"].astype(bool), inside)
    flags = out["in_view"].reshape(40, 6, 4)
    changes = np.abs(np.diff(flags.astype(int), axis=1)).sum()
    assert changes > 10  # particles come and go
    # Uniform start and reflecting walls keep the density uniform: the fraction in view is
    # the field's share of the region's area.
    share = (16 / (16 + 2 * 0.5 / PX)) ** 2
    assert abs(flags.mean() - share) < 0.08, (flags.mean(), share)
    # Reflecting walls keep every particle inside the region (field +- 0.5 um).
    margin = 0.5 / PX
    tr = out["trajectories"][..., :2]
    assert tr.min() >= -0.5 - margin - 1e-3 and tr.max() <= 15.5 + margin + 1e-3


def test_exposure_position_follows_the_particle_where_the_laser_saw_it(engine):
    """A particle diffusing fast: the exposure-weighted position is its position while
    the laser passed over it.  Check it against Eq. 1 weights applied by hand to the
    stored trajectory, and check that it differs from the whole-frame centroid."""
    out = movie(engine, 30, 2, particles={"diffusion_um2_s": 1.0})
    tr = out["trajectories"][:, 0].astype(np.float64)  # (N, T, 3), scan order
    r = np.arange(600) // 25
    c = np.arange(600) % 25
    w = eq1_signal(tr[..., 0] - c, tr[..., 1] - r, tr[..., 2])
    ex = (w * tr[..., 0]).sum(1) / w.sum(1)
    ey = (w * tr[..., 1]).sum(1) / w.sum(1)
    np.testing.assert_allclose(out["exposure_xy"][:, 0, 0], ex, atol=2e-3)
    np.testing.assert_allclose(out["exposure_xy"][:, 0, 1], ey, atol=2e-3)
    gap = np.hypot(*(out["exposure_xy"][:, 0] - out["centroids"][:, 0]).T)
    assert np.median(gap) > 0.2


# --- time stamps of predictions ------------------------------------------------------------


@pytest.mark.parametrize("target", ["exposure", "centroid"])
def test_predict_stamps_each_localisation_with_the_scan_time_of_a_fixed_particle(tmp_path, target):
    """A fixed, bright particle filmed for 4 frames with a 3 ms flyback.  An
    exposure-target model stamps it with frame start + y line + x dwell at its position;
    a centroid-target model with frame start + the frame's mean pixel time."""
    import tifffile
    import pandas as pd

    from conftest import one_line_error, overfit_run, run_cli
    from factory.kernel import simulate

    x0, y0, F, fly = 12.0, 9.0, 4, 3.0
    cfg, ds = dataset(None, n_movies=1, movie={"n_frames": F, "frame_flyback_ms": fly},
                      particles={"diffusion_um2_s": 0.0, "n_qd": 40.0,
                                 "xy_start": {"type": "fixed", "x_px": x0, "y_px": y0}})
    frames = simulate(ds, cfg.seed)["images"]
    tifffile.imwrite(tmp_path / "movie.tif", frames, photometric="minisblack")
    run = overfit_run(tmp_path / "run", target=target)
    r = run_cli("predict", run.path, tmp_path / "movie.tif", "--out", tmp_path / "p.csv",
                "--frame-flyback-ms", fly, "--all")
    assert r.returncode == 0, r.stderr
    assert "frame flyback 3 ms" in r.stderr and "command line" in r.stderr
    t = pd.read_csv(tmp_path / "p.csv")
    assert list(t.columns[:2]) == ["frame", "t_s"] and t["t_s"].notna().all()
    top = t.sort_values("score").groupby("frame").tail(1).sort_values("frame")
    assert list(top.frame) == list(range(F))
    line = 25 * DWELL + RETRACE
    period = 24 * 25 * DWELL + 23 * RETRACE + fly * 1e-3
    if target == "exposure":
        expect = top.frame * period + top.y * line + top.x * DWELL
        true = top.frame * period + y0 * line + x0 * DWELL
        assert np.abs(top.t_s - true).max() < line  # within one line of the pixel's scan time
    else:
        expect = top.frame * period + hand_pixel_times(24, 25, False).mean()
    np.testing.assert_allclose(top.t_s, expect, rtol=0, atol=1e-9)
    # A negative timing flag is refused in one line.
    one_line_error(run_cli("predict", run.path, tmp_path / "movie.tif", "--out", tmp_path / "q.csv",
                           "--line-retrace-ms", "-1"), "--line-retrace-ms -1.0: a time must be >= 0")
    assert not (tmp_path / "q.csv").exists()


# --- stores, loaders, inspect and preview of movies ----------------------------------------


@pytest.fixture(scope="module")
def movie_store(tmp_path_factory):
    import yaml

    from conftest import run_cli

    root = tmp_path_factory.mktemp("movies")
    cfg = root / "m.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 4, "datasets": {"test_m": {
        "n_movies": 15, "movie": {"n_frames": 5, "margin_um": 0.5}, "image": {"height_px": 20, "width_px": 20},
        "particles": {"count": {"type": "poisson", "mean": 4, "max": 8}, "diffusion_um2_s": 0.5, "n_qd": 30.0},
        "output": {"chunk_images": 64}}}}))
    r = run_cli("build", cfg, "--out", root, "-q")
    assert r.returncode == 0, r.stderr
    return root / "test_m.h5"


def test_loader_targets_are_the_particles_in_view(movie_store):
    from factory.stores import Store
    from loaders.datasets import StoreBatches

    with Store(movie_store) as st:
        exp, cen, view = st.read("exposure_xy"), st.read("centroids"), st.read("in_view").astype(bool)
        assert st.chunk_rows == 65  # 64 rounded up to whole movies of 5 frames
    for target, truth in (("exposure", exp), ("centroid", cen)):
        images, t = StoreBatches(movie_store, batch_size=30, target=target)[0]  # one chunk: 65 frames
        pts = t["points"].numpy()
        n = len(pts)
        view_b, truth_b = view[:n], truth[:n]
        kept = np.isfinite(pts).all(-1)
        assert n == 65 and kept.sum() > 10 and not (kept & ~view_b).any()  # only particles in view
        np.testing.assert_array_equal(pts[kept], truth_b[kept])
        inside = (pts[kept] >= -0.5).all() and (pts[kept] < 19.5).all()
        assert inside


def test_inspect_and_preview_show_movies(movie_store, tmp_path):
    import json

    from conftest import one_line_error, run_cli

    r = run_cli("inspect", movie_store, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)[0]
    assert s["n_movies"] == 15 and s["parameters"]["movie"]["n_frames"] == 5
    assert 0 < s["stats"]["particles_in_view_per_frame"] <= 8
    assert s["stats"]["frame_period_ms"] == pytest.approx(400 * 2e-3 + 19 * 1.1 + 1.1)
    for name in ("strip.png", "movie.gif"):
        r = run_cli("preview", movie_store, "--out", tmp_path / name, "--movie", "2")
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "strip.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "movie.gif").read_bytes()[:6] == b"GIF89a"
    one_line_error(run_cli("preview", movie_store, "--out", tmp_path / "x.png", "--movie", "15"),
                   "movie 15 is out of range (the store has movies 0..14)")
