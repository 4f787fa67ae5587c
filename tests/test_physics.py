"""Physical laws the simulator must obey, checked on both engines (kernel and NumPy)."""

import numpy as np
import pytest

from conftest import dataset
from factory.kernel import simulate
from factory.scan import frame_time_s, pixel_times_s, step_times_s

PX = 0.07
SXY, SZ, NBKG = 0.21, 1.36, 8.4


def eq1(X, Y, Z, x, y, z, nqd):
    """Eq. 1 of the paper, written out by hand (lengths in um)."""
    return (nqd / (2 * np.pi * SXY**2) * np.exp(-((X - x) ** 2 + (Y - y) ** 2) / (2 * SXY**2))
            / (np.sqrt(2 * np.pi) * SZ) * np.exp(-((Z - z) ** 2) / (2 * SZ**2)) + NBKG)


def test_static_particle_mean_image_is_eq1(engine):
    """D = 0: the expectation is Eq. 1 and the mean of many noisy images converges to it."""
    n = 3000
    out = engine(n, particles={"diffusion_um2_s": 0.0, "xy_start": {"type": "fixed", "x_px": 12.3, "y_px": 10.6},
                               "z_start_um": 0.4})
    rows, cols = np.mgrid[0:24, 0:25]
    truth = eq1(12.3 * PX, 10.6 * PX, 0.4, cols * PX, rows * PX, 0.0, 10.0)
    assert truth.max() > NBKG + 9  # the particle really is there
    np.testing.assert_allclose(out["expected"], np.broadcast_to(truth, out["expected"].shape), rtol=1e-5)
    mean = out["images"].mean(0)
    z = (mean - truth) / np.sqrt(truth / n)  # Poisson: standard error of the mean
    assert np.abs(z).max() < 5
    assert abs(z.mean()) < 5 / np.sqrt(z.size)


def test_msd_is_2dt_per_axis_over_pixel_and_retrace_steps(engine):
    D = 1.3
    out = engine(1500, particles={"diffusion_um2_s": D, "z_start_um": 0.0})
    tr = out["trajectories"][:, 0].astype(np.float64)  # (N, T, 3)
    tr[..., :2] *= PX  # to um
    t = step_times_s(24, 25, 2.0, 1.1)
    d = np.diff(tr, axis=1)  # (N, T-1, 3)
    dt = np.diff(t)
    within = np.isclose(dt, 2e-6)
    across = ~within
    assert across.sum() == 23 and np.allclose(dt[across], 2e-6 + 1.1e-3)
    for mask in (within, across):
        for axis in range(3):
            msd = (d[:, mask, axis] ** 2).mean()
            expected = 2 * D * dt[mask].mean()
            n = d[:, mask, axis].size
            assert abs(msd / expected - 1) < 5 * np.sqrt(2 / n), (mask.sum(), axis, msd, expected)
    # Over the whole frame, the displacement variance grows as 2 D t.
    total = tr[:, -1] - tr[:, 0]
    for axis in range(3):
        ratio = (total[:, axis] ** 2).mean() / (2 * D * t[-1])
        assert abs(ratio - 1) < 5 * np.sqrt(2 / len(total))


def test_background_counts_have_variance_equal_to_mean(engine):
    out = engine(2000, particles={"n_qd": 0.0})
    x = out["images"].astype(np.float64)
    assert np.all(out["expected"] == np.float32(NBKG))
    n = x.size
    assert abs(x.mean() - NBKG) < 5 * np.sqrt(NBKG / n)
    # Var of the sample variance of a Poisson(l) variable ~ (l + 2 l^2) / n.
    assert abs(x.var() - NBKG) < 5 * np.sqrt((NBKG + 2 * NBKG**2) / n)


@pytest.mark.parametrize("lam", [0.3, 4.0, 9.9, 10.1, 37.0, 800.0])
def test_poisson_sampler_mean_and_variance(lam):
    cfg, ds = dataset(4000, particles={"n_qd": 0.0}, background={"n_bkg": lam})
    x = simulate(ds, cfg.seed)["images"].astype(np.float64)
    n = x.size
    assert abs(x.mean() - lam) < 5 * np.sqrt(lam / n)
    assert abs(x.var() / lam - 1) < 5 * np.sqrt((1 + 2 * lam) / (lam * n))


def test_centroids_are_trajectory_means(engine):
    out = engine(300, particles={"count": {"type": "poisson", "mean": 2.0, "max": 4}})
    tr = out["trajectories"].astype(np.float64)
    counts = out["n_particles"]
    assert counts.max() > 1 and counts.min() <= 1
    for i in range(len(counts)):
        c = counts[i]
        np.testing.assert_allclose(out["centroids"][i, :c], tr[i, :c, :, :2].mean(1), atol=1e-4)
        assert np.isnan(out["centroids"][i, c:]).all()
        assert np.isnan(out["diffusion"][i, c:]).all() and np.isfinite(out["diffusion"][i, :c]).all()


def test_pmt_keeps_the_mean_and_adds_the_excess_variance(engine):
    gain, enf, offset = 20.0, 1.5, 100.0
    out = engine(2000, particles={"n_qd": 0.0},
                 detector={"type": "pmt", "gain_adu_per_photon": gain, "excess_noise_factor": enf,
                           "offset_adu": offset})
    x = out["images"].astype(np.float64)
    n = x.size
    var = gain**2 * enf * NBKG + 1 / 12  # + rounding to integer ADU
    assert abs(x.mean() - (offset + gain * NBKG)) < 5 * np.sqrt(var / n)
    # Sample-variance tolerance from the measured fourth moment.
    m4 = ((x - x.mean()) ** 4).mean()
    assert abs(x.var() - var) < 5 * np.sqrt((m4 - x.var() ** 2) / n)
    assert x.var() > 1.3 * gain**2 * NBKG  # clearly more than pure shot noise


def test_pmt_with_read_noise_has_the_cumulants_of_compound_poisson_gamma_plus_gauss(engine):
    """n ~ Poisson(m) photons, each amplified by a gamma gain of mean g and excess noise F,
    plus Gaussian read noise r: the cumulants of ADU - offset are k1 = m g,
    k2 = m g^2 F + r^2 (+ 1/12 from rounding), k3 = m g^3 F (2F - 1) (SPEC, "Calibrating a
    microscope"; the Gaussian adds no third cumulant)."""
    g, enf, offset, r = 6.0, 1.3, 200.0, 12.0
    out = engine(1500, particles={"n_qd": 0.0},
                 detector={"type": "pmt", "gain_adu_per_photon": g, "excess_noise_factor": enf,
                           "offset_adu": offset, "read_noise_adu": r})
    x = out["images"].astype(np.float64).ravel()
    n, mu = x.size, x.mean()
    c = x - mu
    m2, m3, m4, m6 = (c**2).mean(), (c**3).mean(), (c**4).mean(), (c**6).mean()
    k1, k2, k3 = g * NBKG, g**2 * enf * NBKG + r**2 + 1 / 12, g**3 * enf * (2 * enf - 1) * NBKG
    assert abs(mu - offset - k1) < 5 * np.sqrt(m2 / n)
    assert abs(m2 - k2) < 5 * np.sqrt((m4 - m2**2) / n)
    # Standard error of the third central moment (Kendall & Stuart): (m6 - m3^2 - 6 m4 m2 + 9 m2^3) / n.
    assert abs(m3 - k3) < 5 * np.sqrt((m6 - m3**2 - 6 * m4 * m2 + 9 * m2**3) / n)
    assert m2 > 1.3 * (g**2 * enf * NBKG)  # the read noise is really there


def test_read_noise_below_zero_adu_is_clipped_not_wrapped(engine):
    """No offset, faint background, read noise: the ADC clips at 0; nothing wraps to 65535."""
    out = engine(200, particles={"n_qd": 0.0}, background={"n_bkg": 0.05},
                 detector={"type": "pmt", "gain_adu_per_photon": 2.0, "offset_adu": 0.0, "read_noise_adu": 10.0})
    x = out["images"]
    assert x.max() < 100 and (x == 0).mean() > 0.4  # about half the pixels fall below zero


@pytest.mark.parametrize("direction", ["unidirectional", "bidirectional"])
def test_each_pixel_sees_the_particle_where_it_was_at_its_scan_time(engine, direction):
    """Eq. 1 applied to the stored trajectory at each pixel's time step gives the image.

    Bidirectional scans reverse every other line, so odd rows are matched to time steps
    running from the right edge to the left."""
    out = engine(64, particles={"diffusion_um2_s": 1.75}, scan={"direction": direction})
    tr = out["trajectories"][:, 0].astype(np.float64)  # (N, T, 3)
    rows, cols = np.mgrid[0:24, 0:25]
    times = pixel_times_s(24, 25, 2.0, 1.1, bidirectional=direction == "bidirectional")
    step = np.rint(times / 2e-6).astype(int)
    # Pixel start time -> index in time order.
    order = np.argsort(times.ravel(), kind="stable")
    t_index = np.empty(600, int)
    t_index[order] = np.arange(600)
    t_index = t_index.reshape(24, 25)
    if direction == "bidirectional":
        assert t_index[1, 24] == 25 and t_index[1, 0] == 49 and t_index[2, 0] == 50
    else:
        assert t_index[1, 0] == 25
    assert np.all(np.diff(step.ravel()[order]) > 0)
    pos = tr[:, t_index]  # (N, 24, 25, 3)
    recon = eq1(pos[..., 0] * PX, pos[..., 1] * PX, pos[..., 2], cols * PX, rows * PX, 0.0, 10.0)
    np.testing.assert_allclose(out["expected"], recon, rtol=2e-4)
    if direction == "bidirectional":
        # The unidirectional mapping does not explain a bidirectional image.
        wrong = eq1(tr[:, :600].reshape(-1, 24, 25, 3)[..., 0] * PX,
                    tr.reshape(-1, 24, 25, 3)[..., 1] * PX, tr.reshape(-1, 24, 25, 3)[..., 2],
                    cols * PX, rows * PX, 0.0, 10.0)
        assert not np.allclose(out["expected"], wrong, rtol=1e-2)


def test_substeps_average_eq1_across_the_dwell(engine):
    """With sub-steps the laser sweeps the pixel: a static particle sees Eq. 1 averaged
    over positions spread across the pixel along the scan direction."""
    S = 4
    out = engine(2, particles={"diffusion_um2_s": 0.0, "xy_start": {"type": "fixed", "x_px": 10.0, "y_px": 8.0}},
                 scan={"substeps_per_dwell": S})
    rows, cols = np.mgrid[0:24, 0:25]
    frac = (np.arange(S) + 0.5) / S - 0.5
    truth = np.mean([eq1(10 * PX, 8 * PX, 0, (cols + f) * PX, rows * PX, 0, 10) for f in frac], axis=0)
    np.testing.assert_allclose(out["expected"][0], truth, rtol=1e-5)


def test_frame_time_matches_the_paper_and_the_walk(engine):
    """24 lines of 25 pixels x 2 us plus a 1.1 ms retrace each: 24 x 1.15 ms = 27.6 ms
    (SPEC).  The stored walk agrees: over its first to last pixel step (one dwell and one
    retrace short of a frame) the displacement variance is 2 D t, which at D = 1.75 is
    the SPEC's blur of about 4 px per axis over a frame."""
    assert frame_time_s(24, 25, 2.0, 1.1) == pytest.approx(24 * (25 * 2e-6 + 1.1e-3), rel=1e-12)
    assert frame_time_s(24, 25, 2.0, 1.1) == pytest.approx(0.0276, rel=1e-12)
    D = 1.75
    out = engine(2000, particles={"diffusion_um2_s": D})
    tr = out["trajectories"][:, 0].astype(np.float64)
    span = frame_time_s(24, 25, 2.0, 1.1) - 2e-6 - 1.1e-3
    d = (tr[:, -1, 0] - tr[:, 0, 0]) * PX
    assert abs(d.var() / (2 * D * span) - 1) < 5 * np.sqrt(2 / len(d))
    assert np.sqrt(d.var()) / PX == pytest.approx(np.sqrt(2 * D * 0.0276) / PX, rel=0.15)
    assert 3.6 < np.sqrt(d.var()) / PX < 5.2
