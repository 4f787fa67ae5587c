"""Scores per particle on fields (models.evaluation.fields) and the TrackPy user pipeline, on hand-made
cases and on spots drawn here from the physics (not the simulator)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.evaluation.fields import (MovieTruth, detected_share, longest_run, match_tracks, plot_field, score_particles,
                                      scored_runs, summarise, within)


def _truth(F: int, P: int, seed: int = 0, on=None, D=0.1, dt=0.5, px=0.1):
    """Brownian particles (px), exposure = centroid, times one frame period apart."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0, np.sqrt(2 * D * dt) / px, (F, P, 2))
    c = 50.0 + 40.0 * np.arange(P)[None, :, None] + np.cumsum(steps, 0)
    t = np.repeat(np.arange(F)[:, None] * dt, P, 1).astype(np.float64)
    return MovieTruth(c, c.copy(), t, t.copy(), np.full(P, D), on)


def test_longest_run_and_which_particles_are_scored():
    assert longest_run(np.array([1, 1, 0, 1, 1, 1, 0], bool)) == (3, 6)
    assert longest_run(np.zeros(4, bool)) == (0, 0)
    tr = _truth(30, 3)
    tr.centroids[9:, 1] = np.nan  # particle 1 in view 9 frames: not scored
    tr.centroids[:20, 2] = np.nan  # particle 2 in view 10 frames: scored
    assert scored_runs(tr) == {0: (0, 30), 2: (20, 30)}
    on = np.ones((30, 3), np.float32)
    on[:16, 0] = 0.2  # on in 14 of 30 frames: fewer than half, not scored
    on[:15, 2] = 0.0  # particle 2 on in all 10 of its frames in view
    tr.on_fraction = on
    assert scored_runs(tr) == {2: (20, 30)}


def test_a_track_matches_a_particle_when_sixty_percent_of_its_points_are_near():
    tr = _truth(10, 2)
    xy = tr.centroids[:, 0].copy()
    good = xy.copy()
    good[:4] += 5.0  # 6 of 10 within 3 px: matched
    bad = xy.copy()
    bad[:5] += 5.0  # 5 of 10: not
    rows = [pd.DataFrame({"frame": np.arange(10), "x": a[:, 0], "y": a[:, 1], "track": k})
            for k, a in ((7, good), (8, bad))]
    assert match_tracks(pd.concat(rows), tr) == {7: 0}


def test_the_share_of_a_particles_frames_the_detector_saw_by_hand():
    tr = _truth(20, 2)
    tr.exposure_xy[:, 1] += 10.0  # particle 1: its exposure position 10 px from its centroid
    c0, c1, e1 = tr.centroids[:, 0], tr.centroids[:, 1], tr.exposure_xy[:, 1]
    rows = [(f, c0[f, 0] + 2.9, c0[f, 1]) for f in range(0, 20, 2)]  # particle 0: every other frame, 2.9 px off
    rows += [(f, c0[f, 0], c0[f, 1] + 3.1) for f in range(1, 20, 2)]  # and 3.1 px off in the others: not near
    rows += [(f, e1[f, 0] - 2.0, e1[f, 1]) for f in range(5)]  # particle 1: near its exposure position in 5 frames
    rows += [(f, c1[f, 0], c1[f, 1] + 1.0) for f in range(15, 20)]  # and near its centroid in 5 more
    loc = pd.DataFrame(rows, columns=["frame", "x", "y"]).sample(frac=1.0, random_state=1)  # any row order
    assert detected_share(loc, tr) == {0: 0.5, 1: 0.5}
    on = np.ones((20, 2), np.float32)
    on[10:, 1] = 0.0  # particle 1 off in frames 10-19: only its 10 on frames count, 5 of them seen
    tr.on_fraction = on
    assert detected_share(loc, tr) == {0: 0.5, 1: 0.5}
    on[:5, 1] = 0.0
    on[10:15, 1] = 1.0  # now on in frames 5-14 only: none of them seen
    assert detected_share(loc, tr) == {0: 0.5, 1: 0.0}
    assert detected_share(loc.iloc[:0], tr) == {0: 0.0, 1: 0.0}


def test_within_a_factor_and_the_summary_by_hand():
    assert within([1.5, 1.51, 1 / 1.5, 0.66, np.nan, 0.0], [1.0] * 6).tolist() == [True, False, True, False, False, False]
    t = pd.DataFrame({"particle": [0, 1, 2, 3], "frames_in_view": 10, "true_D_um2_s": [0.1, 0.1, 0.2, 0.2],
                      "matched": [True, True, True, False], "D_um2_s": [0.1, 1.0, 0.25, np.nan],
                      "floor_D_um2_s": [0.1, 0.1, 0.2, 0.2]})
    s = summarise(t)
    assert s["particles"] == 4 and s["matched"] == 0.75 and s["d_within"] == 0.5 and s["floor_d_within"] == 1.0
    # |log10| errors 0, 1, log10(1.25): the median is log10(1.25)
    assert s["median_abs_log10"] == pytest.approx(np.log10(1.25))


def test_the_true_positions_as_tracks_score_at_the_floor():
    """Tracks that are the truth itself give every scored particle the floors' D: the
    CVE's, track by track, and the pooled estimator's, over the movie's tracks at once."""
    from models.tracking.tracks import diffusion_table

    tr = _truth(40, 4, seed=3)
    tracks = pd.concat([pd.DataFrame({"frame": np.arange(40), "t_s": tr.centroid_t_s[:, p], "x": tr.centroids[:, p, 0],
                                      "y": tr.centroids[:, p, 1], "track": 10 + p}) for p in range(4)])
    for estimator, floor in (("cve", "floor_D_um2_s"), ("pooled", "floor_pooled_D_um2_s")):
        s = score_particles(tracks, diffusion_table(tracks, 0.1, 0.0, estimator=estimator), tr, 0.1, 0.0)
        assert s["matched"].all() and len(s) == 4
        np.testing.assert_allclose(s["D_um2_s"].to_numpy(), s[floor].to_numpy(), rtol=1e-12)
    assert not np.allclose(s["floor_D_um2_s"], s["floor_pooled_D_um2_s"])  # two estimators, two floors


def test_the_floor_of_a_blinking_particle_leaves_out_the_frames_it_spent_off():
    """The floor is what a perfect pipeline gets from what the microscope shows: a
    particle off in frames 10-21 (on for a quarter of frame 22, half of frame 23) has its
    floor from the other frames' true centroids, the CVE (Vestergaard 2014: mean squared
    step over 2 dt plus the covariance of successive steps over dt, dt the mean step time)
    written out here on them."""
    tr = _truth(40, 2, seed=5)
    on = np.ones((40, 2), np.float32)
    on[10:22, 0] = 0.0
    on[22, 0], on[23, 0] = 0.25, 0.5
    tr.on_fraction = on
    s = score_particles(pd.DataFrame(columns=["frame", "x", "y", "track"]), pd.DataFrame(columns=["track", "D_um2_s"]),
                        tr, 0.1, 0.0).set_index("particle")
    keep = np.r_[0:10, 23:40]
    xy = tr.centroids[keep, 0] * 0.1
    t = tr.centroid_t_s[keep, 0]
    dx, dt = np.diff(xy, axis=0), np.diff(t)
    by_hand = ((dx**2).mean(0) / (2 * dt.mean()) + (dx[1:] * dx[:-1]).mean(0) / dt.mean()).mean()
    assert s.loc[0, "floor_D_um2_s"] == pytest.approx(by_hand, rel=1e-12)
    # particle 1 never blinks: its floor is over all 40 frames, as without on_fraction
    tr.on_fraction = None
    assert s.loc[1, "floor_D_um2_s"] == score_particles(pd.DataFrame(columns=["frame", "x", "y", "track"]),
                                                        pd.DataFrame(columns=["track", "D_um2_s"]), tr, 0.1,
                                                        0.0).set_index("particle").loc[1, "floor_D_um2_s"]


def _spots_movie(F, centres_px, sigma_px=1.5, n_photons=400.0, bkg=2.0, size=96, seed=0):
    """Gaussian spots drawn here (Poisson photons on a flat background), one per centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((F, size, size), np.uint16)
    for f in range(F):
        lam = np.full((size, size), bkg)
        for x, y in centres_px[f]:
            lam += n_photons / (2 * np.pi * sigma_px**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma_px**2))
        out[f] = rng.poisson(lam)
    return out


def test_the_trackpy_user_pipeline_locates_as_trackpy_batch_does_by_default():
    """The baseline runs `trackpy.batch` with TrackPy's own default number of worker
    processes (what a user who does not pin it gets), and those workers give the same
    features as one process."""
    import inspect

    import trackpy

    from models.detectors.trackpy import USER_PROCESSES, user_locate

    assert inspect.signature(trackpy.batch).parameters["processes"].default == USER_PROCESSES
    rng = np.random.default_rng(5)
    centres = rng.uniform(10, 50, (6, 4, 2))
    frames = _spots_movie(6, centres, size=60)
    ours = user_locate(frames, 7, 20.0)
    trackpy.quiet()
    one = trackpy.batch(frames, 7, minmass=20.0, preprocess=True, processes=1)
    assert len(ours) >= 12 and sorted(ours["frame"].unique()) == list(range(6))
    pd.testing.assert_frame_equal(ours.reset_index(drop=True), one.reset_index(drop=True))


def test_the_trackpy_user_pipeline_gives_back_d_from_the_msd_slope():
    """Three spots on Brownian walks (D 0.02 um^2/s, 0.1 um pixels, 0.5 s frames: 1.4 px
    per axis per frame) for 150 frames: trackpy's imsd line fit gives D back within 20%
    (pooled) and the line fit to each particle's own MSD, and the tuning picks a diameter and a minmass that find every spot."""
    from models.evaluation.metrics import Points
    from models.detectors.trackpy import run_user_pipeline, user_search_range_px
    from models.evaluation.tuning import tune_user_pipeline

    F, D, dt, px = 150, 0.02, 0.5, 0.1
    rng = np.random.default_rng(3)
    walk = np.cumsum(rng.normal(0, np.sqrt(2 * D * dt) / px, (F, 3, 2)), 0)
    walk -= walk.mean(0)
    centres = np.array([[35.0, 35.0], [105.0, 45.0], [70.0, 105.0]])[None] + walk
    assert centres.min() > 8 and centres.max() < 132  # in the field, away from its edge
    frames = _spots_movie(F, centres, size=140)
    gt = Points.from_masked(centres[:20] * px)
    pipe = tune_user_pipeline(frames[:20], gt, px, 0.15, user_search_range_px(2 * D, dt, px))
    assert pipe.diameter in (5, 7) and pipe.minmass > 0
    tracks, d = run_user_pipeline(frames, pipe, px, dt)
    assert tracks["track"].nunique() == 3 and len(d) == 3
    assert float(d["D_um2_s"].mean()) == pytest.approx(D, rel=0.2)
    # Each track's D is the line fit (4 lags) to the MSD of its particle's true walk,
    # computed here, within the localisation error's share.
    for track, est in zip(d["track"], d["D_um2_s"]):
        first = tracks[tracks["track"] == track].sort_values("frame").iloc[0]
        p = int(np.argmin(np.hypot(*(centres[int(first["frame"])] - [first["x"], first["y"]]).T)))
        x = centres[:, p] * px
        msd = [np.mean(np.sum((x[lag:] - x[:-lag]) ** 2, 1)) for lag in range(1, 5)]
        assert est == pytest.approx(np.polyfit(np.arange(1, 5) * dt, msd, 1)[0] / 4, rel=0.1)


def test_movie_truth_of_the_simulators_rows_with_and_without_blinking():
    """The truth of a simulated movie: particles out of view are NaN, blinking is kept
    only where the particles blink, and a particle scored is one the movie shows."""
    from conftest import dataset
    from factory.kernel import simulate

    for blink in (None, {}):
        _, ds = dataset(None, 2, n_movies=1, movie={"n_frames": 12, "margin_um": 1.0},
                        image={"height_px": 48, "width_px": 48},
                        particles={"count": 6, "diffusion_um2_s": 0.05, "blinking": blink})
        rows = simulate(ds, 2)
        t_c = rows["frame_start_s"][:, None] + np.zeros_like(rows["diffusion"], np.float64)
        tr = MovieTruth.of_rows(rows, 0, 12, t_c)
        assert (tr.on_fraction is None) == (blink is None)
        inview = rows["in_view"].astype(bool)
        np.testing.assert_array_equal(np.isfinite(tr.centroids).all(-1), inview)
        for p, (a, b) in scored_runs(tr).items():
            assert inview[a:b, p].all() and b - a >= 10


class _Oracle:
    """A detector that reports where the laser saw each particle in view (the store's
    exposure truth): the evaluation's linking and per-particle scoring on a perfect
    localiser."""

    name, label, target, timestamps, threshold = "oracle", "oracle", "exposure", "scan", None
    ndim, z_step_um = 2, None  # the rest of the Detector protocol: images

    def batch_frames(self, height: int, width: int) -> int:
        return 1

    def __init__(self, rows):
        self.rows = rows

    def detect(self, images, progress=False, min_score=None):
        from loaders.datasets import truth_points

        pts = truth_points(self.rows["exposure_xy"], self.rows["n_particles"], self.rows["in_view"], True,
                           *images.shape[1:])
        f, p = np.nonzero(np.isfinite(pts).all(-1))
        return pd.DataFrame({"frame": f, "x": pts[f, p, 0], "y": pts[f, p, 1], "score": 1.0, "sigma": 1.0})


def _oracle_tracks(tmp_path, n_movies: int, size_px: int, count: int, d_low: float, d_high: float) -> dict:
    """`evaluate_detector` with the truth as localisations on a movie store built here:
    the store's track scores from metrics.json."""
    import json

    from factory.build import build
    from factory.config import parse_config
    from factory.stores import Store
    from models.evaluation.evaluate import evaluate_detector

    cfg = parse_config({"seed": 3, "datasets": {"test_m": {
        "n_movies": n_movies, "movie": {"n_frames": 20, "margin_um": 0.5},
        "image": {"height_px": size_px, "width_px": size_px, "pixel_size_um": 0.1},
        "particles": {"count": count, "diffusion_um2_s": {"type": "log_uniform", "low": d_low, "high": d_high}},
        "output": {"trajectories": False, "expected": False}}}})
    build(cfg, tmp_path / "data", progress=False)
    with Store(tmp_path / "data" / "test_m.h5") as st:
        rows = {k: st.read(k) for k in ("exposure_xy", "n_particles", "in_view")}
    evaluate_detector(_Oracle(rows), tmp_path / "data", tmp_path / "run", progress=False)
    return json.loads((tmp_path / "run" / "metrics.json").read_text())["tracks"]["test_m"]


def test_evaluate_scores_tracks_per_particle_and_a_perfect_localiser_is_matched_everywhere(tmp_path):
    """`evaluate_detector` on a movie store: metrics.json carries the per-particle
    scores; with the truth as localisations every scored particle has its track, the
    links are right, and D is within 1.5x about as often as the floor's."""
    t = _oracle_tracks(tmp_path, n_movies=3, size_px=96, count=4, d_low=0.01, d_high=0.1)
    p = t["particles"]
    assert p["particles"] >= 6 and p["matched"] == 1.0, p
    assert t["correct_link_fraction"] > 0.98
    # The linker's floor links the same true positions by its own route (no detector,
    # no CSV): the same links, so the same share.
    assert t["correct_link_fraction_truth_positions"] == t["correct_link_fraction"]
    assert p["d_within"] >= p["floor_d_within"] - 0.2, p


def test_the_linkers_floor_is_the_truth_linked_alike_and_crowding_costs_it(tmp_path):
    """Twelve fast particles in 48 x 48 px come closer than their steps: the true positions
    linked the same way (the floor of correct links) get some links wrong, and a perfect
    localiser, whose localisations are those positions, gets exactly the floor."""
    t = _oracle_tracks(tmp_path, n_movies=2, size_px=48, count=12, d_low=0.2, d_high=2.0)
    assert t["links_between_matched"] > 200
    assert 0.5 < t["correct_link_fraction_truth_positions"] < 0.95, t
    assert t["correct_link_fraction_truth_positions"] == t["correct_link_fraction"]


def test_the_field_picture_shows_each_pipelines_share_within_the_factor(tmp_path):
    """Two pipelines and the floor on four particles, shares counted here by hand:
    ours 2 of 4 (1.4x and 1/1.2x in, 2x out, no D out), TrackPy 1 of 4, the floor 3 of 4."""
    t = pd.DataFrame({"particle": range(4), "true_D_um2_s": [0.1, 0.2, 0.05, 0.3],
                      "D_um2_s": [0.14, 0.2 / 1.2, 0.1, np.nan], "floor_D_um2_s": [0.1, 0.2, 0.05, 0.9]})
    tp = t.assign(D_um2_s=[0.1, 0.5, 0.01, 0.01])
    tracks = pd.DataFrame({"track": [0, 0, 1, 1], "x": [3.0, 5.0, 20.0, 22.0], "y": [4.0, 6.0, 10.0, 9.0]})
    fig = plot_field(np.zeros((32, 32)), tracks, {"ours": t, "TrackPy": tp}, tmp_path / "f.png", "field")
    assert (tmp_path / "f.png").stat().st_size > 10_000
    legend = [x.get_text() for x in fig.axes[1].get_legend().get_texts()]
    assert legend == ["within 1.5x", "ours: 0.50 within", "TrackPy: 0.25 within",
                      "floor: the CVE on the true positions: 0.75 within"]
