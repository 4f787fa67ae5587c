"""The diffusion estimators as physical laws, on Brownian tracks simulated here (fine
time steps, positions averaged over an exposure window: motion blur, plus Gaussian
localisation noise), independently of the microscope simulator."""

import numpy as np
import pytest

from models.tracking.diffusion import blur_coefficient_uniform, cve, msd_fit

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
