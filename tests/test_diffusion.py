"""The diffusion estimators as physical laws, on Brownian tracks simulated here (fine
time steps, positions averaged over an exposure window: motion blur, plus Gaussian
localisation noise), independently of the microscope simulator."""

import numpy as np
import pandas as pd
import pytest

from models.tracking.diffusion import (blur_coefficient_uniform, cve, known_sigma, msd_fit, pooled_sigma2,
                                       pooled_sigma2_variance, with_detector_prior)

D_TRUE, DT, TAU, SIGMA = 0.2, 0.08, 0.03, 0.03  # um^2/s, s, s (exposure window), um


def brownian_tracks(n_tracks, n_points, rng, irregular=False, sub=40):
    """Positions (n_tracks, n_points, 2) um and time stamps: each interval's exposure
    window of TAU (at its start) averaged over ``sub`` fine steps, plus noise."""
    jitter = 0.2 * rng.random((n_tracks, n_points)) - 0.1 if irregular else np.zeros((n_tracks, n_points))
    intervals = DT * (1 + jitter)
    xs, ts = [], []
    pos = np.zeros((n_tracks, 2))
    t = np.zeros(n_tracks)
    for k in range(n_points):
        # Walk through the window in sub steps, averaging the position.
        h = TAU / sub
        acc = np.zeros((n_tracks, 2))
        for _ in range(sub):
            pos = pos + rng.normal(0, np.sqrt(2 * D_TRUE * h), (n_tracks, 2))
            acc += pos
        xs.append(acc / sub + rng.normal(0, SIGMA, (n_tracks, 2)))
        ts.append(t + TAU / 2)
        # Then the dark rest of the interval.
        rest = intervals[:, k] - TAU
        pos = pos + rng.normal(0, 1, (n_tracks, 2)) * np.sqrt(2 * D_TRUE * rest)[:, None]
        t = t + intervals[:, k]
    return np.stack(ts, 1), np.stack(xs, 1)


@pytest.fixture(scope="module")
def tracks():
    return brownian_tracks(2000, 40, np.random.default_rng(1))


def test_cve_is_unbiased_within_its_standard_error(tracks):
    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    est = np.array([cve(t[i], xy[i], R).D_um2_s for i in range(len(t))])
    se = est.std() / np.sqrt(len(est))
    assert abs(est.mean() - D_TRUE) < 3 * se, (est.mean(), se)
    # ...and its scatter is what its variance formula predicts.
    half = np.array([cve(t[i], xy[i], R).D_high_um2_s - cve(t[i], xy[i], R).D_um2_s for i in range(50)])
    predicted_sd = np.median(half) / 1.959964
    assert 0.8 < est.std() / predicted_sd < 1.25, (est.std(), predicted_sd)


def test_cve_recovers_the_localisation_variance(tracks):
    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    s2 = np.array([cve(t[i], xy[i], R).sigma2_loc_um2 for i in range(len(t))])
    assert abs(s2.mean() - SIGMA**2) < 3 * s2.std() / np.sqrt(len(s2)), (s2.mean(), SIGMA**2)
    # Without the blur correction the covariance reads s^2 - 2 R D dt: smaller.
    s0 = np.array([cve(t[i], xy[i], 0.0).sigma2_loc_um2 for i in range(len(t))])
    expect0 = SIGMA**2 - 2 * R * D_TRUE * DT
    assert abs(s0.mean() - expect0) < 3 * s0.std() / np.sqrt(len(s0)), (s0.mean(), expect0)


def test_the_confidence_interval_covers_the_truth_at_its_nominal_rate(tracks):
    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    hits = [cve(t[i], xy[i], R, confidence=0.9) for i in range(len(t))]
    cover = np.mean([e.D_low_um2_s <= D_TRUE <= e.D_high_um2_s for e in hits])
    assert 0.86 <= cover <= 0.94, cover


def test_irregular_time_stamps_keep_the_estimate_unbiased():
    t, xy = brownian_tracks(1500, 30, np.random.default_rng(2), irregular=True)
    est = np.array([cve(t[i], xy[i]).D_um2_s for i in range(len(t))])
    assert abs(est.mean() - D_TRUE) < 3 * est.std() / np.sqrt(len(est))


def test_msd_fit_is_close_to_unbiased_and_worse_than_the_cve(tracks):
    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    m = np.array([msd_fit(t[i], xy[i]).D_um2_s for i in range(600)])
    c = np.array([cve(t[i], xy[i], R).D_um2_s for i in range(600)])
    assert abs(np.median(m) / D_TRUE - 1) < 0.1
    assert np.sqrt(np.mean((c - D_TRUE) ** 2)) <= 1.1 * np.sqrt(np.mean((m - D_TRUE) ** 2))


def test_hand_computed_cve():
    # Three displacements along x of 1, -1, 2 um every 1 s: <dx^2> = 2, <dx dx'> = (-1 - 2) / 2.
    t = np.arange(4.0)
    xy = np.array([[0, 0], [1, 0], [0, 0], [2, 0]], float)
    e = cve(t, xy[:, :1])
    assert e.D_um2_s == pytest.approx(2 / 2 + (-1.5) / 1)
    assert e.n_displacements == 3


def test_a_known_localisation_variance_gives_an_unbiased_d_at_a_third_of_the_cves_variance(tracks):
    # With s^2 known the lag-1 moment alone gives D: <dx^2> = 2 D dt (1 - 2 R) + 2 s^2.
    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    est = [known_sigma(t[i], xy[i], SIGMA**2, R) for i in range(len(t))]
    d = np.array([e.D_um2_s for e in est])
    assert abs(d.mean() - D_TRUE) < 3 * d.std() / np.sqrt(len(d)), d.mean()
    # Its scatter is what its variance formula says, and its interval covers at the nominal rate.
    predicted_sd = np.median([e.D_high_um2_s - e.D_um2_s for e in est]) / 1.959964
    assert 0.85 < d.std() / predicted_sd < 1.15, (d.std(), predicted_sd)
    assert 0.93 <= np.mean([e.D_low_um2_s <= D_TRUE <= e.D_high_um2_s for e in est]) <= 0.97
    # Against the CVE on the same tracks: 2 against 6 D^2 / N at small s^2 / (D dt).
    c = np.array([cve(t[i], xy[i], R).D_um2_s for i in range(len(t))])
    assert d.std() < 0.7 * c.std(), (d.std(), c.std())
    # A wrong s^2 shifts D by the hand-computed amount: 2 ds^2 / (2 dt (1 - 2 R)).
    shifted = np.array([known_sigma(t[i], xy[i], 2 * SIGMA**2, R).D_um2_s for i in range(len(t))])
    mean_dt = np.mean(np.diff(t, axis=1))
    assert np.allclose(d - shifted, SIGMA**2 / (mean_dt * (1 - 2 * R)), rtol=1e-6)


def test_hand_computed_known_sigma():
    # Displacements 1, -1, 2 um every 1 s along x, s^2 = 0.25 um^2, R = 0.1:
    # D = (2 - 2 * 0.25) / (2 * 1 * (1 - 0.2)).
    t = np.arange(4.0)
    xy = np.array([[0.0], [1.0], [0.0], [2.0]])
    e = known_sigma(t, xy, 0.25, 0.1)
    assert e.D_um2_s == pytest.approx(1.5 / 1.6)
    assert e.sigma_loc_um == pytest.approx(0.5)
    assert np.isnan(known_sigma(t[:2], xy[:2], 0.25).D_um2_s)  # one displacement: no estimate


def test_the_pooled_variance_is_the_median_of_the_long_tracks_and_a_wrong_link_does_not_move_it(tracks):
    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    est = [cve(t[i], xy[i], R) for i in range(400)]
    s2 = pooled_sigma2(est)
    assert s2 == max(np.median([e.sigma2_loc_um2 for e in est]), 0.0)
    assert abs(s2 - SIGMA**2) < 0.25 * SIGMA**2, s2
    # A track with a 5 um jump (two particles joined) has a huge s^2 of its own; the pool shrugs.
    bad = xy[400].copy()
    bad[20:] += 5.0
    joined = cve(t[400], bad, R)
    assert joined.sigma2_loc_um2 > 20 * SIGMA**2
    assert abs(pooled_sigma2(est + [joined]) - s2) < 0.05 * SIGMA**2
    # Short tracks count only when no track is long; no estimate at all gives NaN.
    short = [cve(t[i, :5], xy[i, :5], R) for i in range(3)]
    assert pooled_sigma2(est + short) == pooled_sigma2(est)
    assert pooled_sigma2(short) == max(np.median([e.sigma2_loc_um2 for e in short]), 0.0)
    # One long track is no pool (its variance needs two): every track with an estimate counts.
    assert pooled_sigma2(est[:1] + short) == max(np.median([e.sigma2_loc_um2 for e in est[:1] + short]), 0.0)
    assert np.isfinite(pooled_sigma2_variance(est[:1] + short))
    assert np.isnan(pooled_sigma2([]))
    # A negative median (s^2 small against D dt / sqrt(N)) is read as the physical bound, 0.
    walks = np.cumsum(np.random.default_rng(3).normal(0, 1, (200, 40, 2)), axis=1)  # instantaneous, exact positions
    exact = [cve(np.arange(40.0), w) for w in walks]
    assert abs(np.median([e.sigma2_loc_um2 for e in exact])) < 0.1  # about 0, of either sign
    below = [e for e in exact if e.sigma2_loc_um2 < 0]
    assert pooled_sigma2(below) == 0.0


def _recordings(t, xy, ids, px, sigma_px=None):
    """Tracks ``ids`` of ``brownian_tracks`` as a table in px of ``px`` um (with a detector's ``sigma``, px)."""
    import pandas as pd

    d = pd.DataFrame({"track": np.repeat(ids, t.shape[1]), "t_s": t[ids].ravel(),
                      "x": xy[ids, :, 0].ravel() / px, "y": xy[ids, :, 1].ravel() / px})
    return d if sigma_px is None else d.assign(sigma=sigma_px)


def test_the_pooled_estimator_on_one_track_is_its_cve_and_on_many_beats_it(tracks):
    from models.tracking.tracks import diffusion_table

    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    px = 0.1  # um per px: the table holds px

    k = next(i for i in range(100) if cve(t[i], xy[i], R).sigma2_loc_um2 > 0)  # a track whose s^2 is not clipped
    one = _recordings(t, xy, [k], px)
    assert diffusion_table(one, px, R, estimator="pooled")["D_um2_s"].iloc[0] == pytest.approx(
        diffusion_table(one, px, R, estimator="cve")["D_um2_s"].iloc[0], rel=1e-9)
    many = _recordings(t, xy, np.arange(600), px)
    pooled = diffusion_table(many, px, R, estimator="pooled")["D_um2_s"].to_numpy()
    alone = diffusion_table(many, px, R, estimator="cve")["D_um2_s"].to_numpy()
    assert abs(pooled.mean() - D_TRUE) < 3 * pooled.std() / np.sqrt(len(pooled))
    assert np.sqrt(np.mean((pooled - D_TRUE) ** 2)) < 0.7 * np.sqrt(np.mean((alone - D_TRUE) ** 2))
    # A store's movies share one pool (keyed by movie and track); a given variance replaces the pool.
    two = _recordings(t, xy, [3, 4], px).assign(movie=lambda d: d["track"] - 3, track=0)
    s2 = pooled_sigma2([cve(t[i], xy[i], R) for i in (3, 4)])
    for given, expect in ((None, s2), (0.0004, 0.0004)):
        got = diffusion_table(two, px, R, estimator="pooled", sigma2_loc_um2=given)
        assert got["movie"].tolist() == [0, 1]
        np.testing.assert_allclose(got["D_um2_s"], [known_sigma(t[i], xy[i], expect, R).D_um2_s for i in (3, 4)],
                                   rtol=1e-9)
        np.testing.assert_allclose(got["sigma_loc_um"], np.sqrt(expect), rtol=1e-9)


def test_one_long_track_among_short_ones_still_gets_the_pool(tracks):
    # A recording with a single long track: the pool is made of all its tracks, so every
    # track's D is the pooled estimator's (not each track's own CVE).
    from models.tracking.tracks import diffusion_table

    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    px = 0.1
    table = pd.concat([_recordings(t, xy, [0], px)] + [_recordings(t[:, :8], xy[:, :8], [i], px) for i in range(1, 30)],
                      ignore_index=True)
    found = [cve(t[0], xy[0], R)] + [cve(t[i, :8], xy[i, :8], R) for i in range(1, 30)]
    s2, var = pooled_sigma2(found), pooled_sigma2_variance(found)
    got = diffusion_table(table, px, R, estimator="pooled")
    expect = [known_sigma(t[0], xy[0], s2, R, sigma2_var_um4=var).D_um2_s] + [
        known_sigma(t[i, :8], xy[i, :8], s2, R, sigma2_var_um4=var).D_um2_s for i in range(1, 30)]
    np.testing.assert_allclose(got["D_um2_s"], expect, rtol=1e-9)
    np.testing.assert_allclose(got["sigma_loc_um"], np.sqrt(s2), rtol=1e-9)


def test_a_track_with_gaps_gets_the_blur_of_its_own_steps():
    # Positions averaged over the whole frame (R = 1/6 for steps of one frame), exact,
    # and 30 % of the frames lost at random: the blur is a time (tau / 6), so a track's
    # steps of g frames on average have R = 1/(6 g).  With R = 1/6 kept for every track,
    # D from the known localisation variance (0 here) comes out about 15 % high
    # (E = D (g - 1/3) / (g (1 - 1/3))); with each track's own R it is unbiased.
    from models.tracking.tracks import diffusion_table

    rng = np.random.default_rng(7)
    n_tracks, n_frames, sub, d = 1500, 30, 20, 0.2
    steps = rng.normal(0, np.sqrt(2 * d * DT / sub), (n_tracks, n_frames * sub, 2))
    xy = np.cumsum(steps, axis=1).reshape(n_tracks, n_frames, sub, 2).mean(2)  # whole-frame means
    keep = rng.random((n_tracks, n_frames)) > 0.3
    keep[:, [0, -1]] = True
    tr, fr = np.nonzero(keep)
    px = 0.1
    table = pd.DataFrame({"track": tr, "frame": fr, "t_s": (fr + 0.5) * DT, "x": xy[tr, fr, 0] / px,
                          "y": xy[tr, fr, 1] / px})
    R = blur_coefficient_uniform(DT, DT)
    own = diffusion_table(table, px, R, estimator="pooled", sigma2_loc_um2=0.0)["D_um2_s"].to_numpy()
    assert abs(own.mean() / d - 1) < 3 * own.std() / np.sqrt(n_tracks) / d
    one = diffusion_table(table.drop(columns="frame"), px, R, estimator="pooled", sigma2_loc_um2=0.0)["D_um2_s"]
    g = np.mean([np.ptp(f) / (len(f) - 1) for f in np.split(fr, np.flatnonzero(np.diff(tr)) + 1)])
    assert one.mean() / d == pytest.approx((g - 1 / 3) / (g * 2 / 3), abs=0.03)
    assert one.mean() / d > 1.1
    # The CVE's D does not depend on R; its s^2 does, and is about 0 with each track's own R.
    s2 = [cve(t["t_s"], t[["x", "y"]].to_numpy() * px, R / (np.ptp(t["frame"]) / (len(t) - 1))).sigma2_loc_um2
          for _, t in table.groupby("track")]
    assert abs(np.mean(s2)) < 3 * np.std(s2) / np.sqrt(n_tracks)


def test_msd_fit_gives_the_fit_of_the_p_it_names():
    # Michalet's rule cycles between 4 and 5 points on this track: whatever the number of
    # iterations, D is the fit with the p the method names (the fewest of a cycle).
    rng = np.random.default_rng(3)
    dt = 0.1
    t = np.arange(60) * dt
    xy = np.cumsum(rng.normal(0, np.sqrt(2 * 0.05 * dt), (60, 2)), 0) + rng.normal(0, 0.1, (60, 2))
    msd = np.array([((xy[k:] - xy[:-k]) ** 2).sum(1).mean() for k in range(1, 60)])
    ps = set()
    for max_iter in (1, 2, 3, 10):
        e = msd_fit(t, xy, max_iter=max_iter)
        p = int(e.method.split("=")[1].rstrip(")"))
        ps.add(p)
        assert e.D_um2_s == pytest.approx(np.polyfit(np.arange(1, p + 1) * dt, msd[:p], 1)[0] / 4, rel=1e-9)
    assert msd_fit(t, xy).method == "msd (p=4)" and len(ps) > 1


def test_the_pooled_interval_covers_the_truth_with_few_tracks_or_many(tracks):
    # The pool's own uncertainty (a median of few s^2 estimates) widens each interval:
    # without it, recordings of a few tracks got 85 % coverage for a nominal 95 %.
    from models.tracking.tracks import diffusion_table

    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    px = 0.1
    for per_recording in (4, 40):
        hits = []
        for g in range(0, 1600, per_recording):
            ids = np.arange(g, g + per_recording)
            d = diffusion_table(_recordings(t, xy, ids, px), px, R)
            hits += list((d["D_low_um2_s"] <= D_TRUE) & (D_TRUE <= d["D_high_um2_s"]))
        assert 0.91 <= np.mean(hits) <= 0.98, (per_recording, np.mean(hits))


def test_hand_computed_detector_prior():
    # Pool 0.002 um^2 with variance 1e-6; the detector says 0.001, trusted to 50 %: its
    # variance (0.5 * 0.001)^2 = 2.5e-7, so the weights are 1e6 and 4e6.
    s2, var = with_detector_prior(0.002, 1e-6, 0.001, prior_sd=0.5)
    assert s2 == pytest.approx((0.002 * 1e6 + 0.001 * 4e6) / 5e6) and var == pytest.approx(1 / 5e6)
    assert with_detector_prior(0.002, 0.0, 0.001) == (0.002, 0.0)  # an exact pool stands
    assert with_detector_prior(0.002, 1e-6, 0.0) == (0.002, 1e-6)  # a detector that says 0 says nothing


def test_the_detectors_own_errors_steady_a_small_pool_and_a_large_pool_corrects_them(tracks):
    # Recordings of 4 tracks: their pool of s^2 is noise against s^2 (each track's
    # estimate scatters by about D dt / sqrt(N)); a detector that knows its error
    # (the simulated SIGMA) steadies it.  A pool of 600 tracks measures s^2 itself and
    # overrules a detector that is off by 2x.
    from models.tracking.tracks import diffusion_table

    t, xy = tracks
    R = blur_coefficient_uniform(TAU, DT)
    px = 0.1
    pool, det, hits = [], [], []
    for g in range(0, 1600, 4):
        ids = np.arange(g, g + 4)
        pool.append(diffusion_table(_recordings(t, xy, ids, px), px, R)["D_um2_s"].to_numpy())
        d = diffusion_table(_recordings(t, xy, ids, px, SIGMA / px), px, R)
        det.append(d["D_um2_s"].to_numpy())
        hits += list((d["D_low_um2_s"] <= D_TRUE) & (D_TRUE <= d["D_high_um2_s"]))
    pool, det = np.concatenate(pool), np.concatenate(det)
    rmse = lambda e: np.sqrt(np.mean((e - D_TRUE) ** 2))  # noqa: E731
    assert rmse(det) < 0.9 * rmse(pool), (rmse(det), rmse(pool))
    assert abs(det.mean() - D_TRUE) < 3 * det.std() / np.sqrt(len(det))
    assert 0.91 <= np.mean(hits) <= 0.98, np.mean(hits)
    ids = np.arange(600)
    alone = diffusion_table(_recordings(t, xy, ids, px), px, R)["D_um2_s"].to_numpy()
    off = diffusion_table(_recordings(t, xy, ids, px, 2 * SIGMA / px), px, R)["D_um2_s"].to_numpy()
    # Without the pool's say, a detector 2x off would move every D by 2 (4 - 1) SIGMA^2 /
    # (2 DT (1 - 2R)), ten standard errors of the mean; the pool keeps 98 % of that away.
    shift = 6 * SIGMA**2 / (2 * DT * (1 - 2 * R))
    assert shift > 10 * alone.std() / np.sqrt(len(alone))
    assert abs(off.mean() - alone.mean()) < 0.02 * shift


def test_time_stamps_that_do_not_advance_give_no_estimate():
    e = known_sigma(np.zeros(5), np.arange(10.0).reshape(5, 2), 0.01)
    assert np.isnan(e.D_um2_s) and np.isnan(e.D_high_um2_s)
