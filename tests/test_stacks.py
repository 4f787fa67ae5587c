"""z-stacks: physical laws of the stack acquisition, written from the physics (Eq. 1 by
hand, the scan timing by hand), not from the simulator's helpers."""

import numpy as np
import pytest

from conftest import dataset
from factory.kernel import simulate
from factory.reference import simulate_numpy

PX, SXY, SZ, NBKG = 0.07, 0.21, 1.36, 8.4
DWELL, RETRACE = 2e-6, 1.1e-3


@pytest.fixture(params=["numba", "numpy"])
def stacks(request):
    """Simulate stacks with the kernel and with the NumPy reference engine (which
    computes the stack truth over all samples at once, not by combining planes)."""

    def run(n, planes, step, **sections):
        stack = {"n_planes": planes, "z_step_um": step, **sections.pop("stack", {})}
        cfg, ds = dataset(None, n_stacks=n, stack=stack, **sections)
        if request.param == "numba":
            return ds, simulate(ds, cfg.seed)
        return ds, simulate_numpy(ds, n, np.random.default_rng(cfg.seed))

    return run


def test_a_fixed_particles_axial_profile_across_planes_is_the_gaussian_of_sigma_z(stacks):
    """D = 0: every plane images the same particle, so the signal summed over a plane
    (expected minus background) follows exp(-(z - z_k)^2 / (2 sigma_z^2)) across the
    planes z_k = -(Z - 1) / 2 * step + k * step."""
    z0, Z, step = 0.37, 12, 0.5
    ds, out = stacks(2, Z, step, particles={"diffusion_um2_s": 0.0, "z_start_um": z0,
                                            "xy_start": {"type": "fixed", "x_px": 12.0, "y_px": 11.0}})
    assert out["images"].shape == (2, Z, 24, 25) and out["expected"].shape == (2, Z, 24, 25)
    planes = -(Z - 1) / 2 * step + np.arange(Z) * step
    np.testing.assert_allclose(out["plane_z_um"][0], planes, atol=1e-6)
    signal = (out["expected"].astype(np.float64) - NBKG).sum((2, 3))  # (2, Z)
    profile = np.exp(-(z0 - planes) ** 2 / (2 * SZ**2))
    np.testing.assert_allclose(signal / signal[:, :1], np.tile(profile / profile[0], (2, 1)), rtol=1e-5)
    # The lateral part is the pixel-sampled Gaussian of Eq. 1 (sums to ~1 / px^2).
    r, c = np.mgrid[0:24, 0:25]
    lateral = np.exp(-((c - 12.0) ** 2 + (r - 11.0) ** 2) * PX**2 / (2 * SXY**2)).sum()
    peak = 10.0 / (2 * np.pi * SXY**2) / (np.sqrt(2 * np.pi) * SZ)
    np.testing.assert_allclose(signal[0], peak * lateral * profile, rtol=1e-5)
    np.testing.assert_allclose(out["centroid_z_um"][:, 0], z0, atol=1e-6)
    np.testing.assert_allclose(out["exposure_z_um"][:, 0], z0, atol=1e-6)


def test_the_3d_walk_runs_through_the_whole_stack_timing_with_msd_2dt(stacks):
    """The particle keeps walking through retraces and the piezo moves: the displacement
    from the first pixel of plane 0 to the first pixel of plane k has variance
    2 D k (H W dwell + (H - 1) retrace + plane flyback) on every axis."""
    D, Z, fly_ms, H, W = 0.5, 4, 7.0, 8, 9
    ds, out = stacks(3000, Z, 0.5, stack={"plane_flyback_ms": fly_ms},
                     image={"height_px": H, "width_px": W},
                     particles={"diffusion_um2_s": D, "z_start_um": 0.0,
                                "xy_start": {"type": "fixed", "x_px": 4.0, "y_px": 4.0}})
    period = H * W * DWELL + (H - 1) * RETRACE + fly_ms * 1e-3
    np.testing.assert_allclose(out["plane_start_s"][0], np.arange(Z) * period, rtol=1e-12)
    traj = out["trajectories"][:, 0].astype(np.float64)  # (n, Z * H * W, 3) in time order
    first = traj[:, ::H * W]  # first pixel step of each plane
    disp = first[:, 1:] - first[:, :1]
    disp[..., :2] *= PX
    for k in range(1, Z):
        msd = (disp[:, k - 1] ** 2).mean(0)
        expect = 2 * D * k * period
        se = expect * np.sqrt(2 / len(disp))
        assert np.all(np.abs(msd - expect) < 4 * se), (k, msd, expect)


def test_stack_truth_is_the_centroid_over_all_pixel_steps_and_the_signal_weighted_position(stacks):
    """The centroid (x, y, z) is the mean of the trajectory over every pixel step of the
    stack; the exposure position and time weight each step by the particle's own Eq. 1
    signal with the focal plane of its plane."""
    Z, step, H, W = 5, 0.6, 10, 11
    ds, out = stacks(6, Z, step, image={"height_px": H, "width_px": W},
                     particles={"diffusion_um2_s": 0.4, "count": 2, "z_start_um": {"low": -1.0, "high": 1.0},
                                "xy_start": {"margin_px": 2}})
    T = H * W
    planes = -(Z - 1) / 2 * step + np.arange(Z) * step
    rows, cols = np.divmod(np.arange(T), W)
    t_plane = rows * (W * DWELL + RETRACE) + cols * DWELL
    for i in range(6):
        for p in range(2):
            tr = out["trajectories"][i, p].astype(np.float64)  # (Z * T, 3)
            np.testing.assert_allclose(out["centroids"][i, p], tr[:, :2].mean(0), atol=1e-4)
            np.testing.assert_allclose(out["centroid_z_um"][i, p], tr[:, 2].mean(), atol=1e-5)
            focal = np.repeat(planes, T)
            lx, ly = np.tile(cols, Z), np.tile(rows, Z)
            w = np.exp(-(((tr[:, 0] - lx) * PX) ** 2 + ((tr[:, 1] - ly) * PX) ** 2) / (2 * SXY**2)
                       - (tr[:, 2] - focal) ** 2 / (2 * SZ**2))
            t = np.concatenate([out["plane_start_s"][i, k] + t_plane for k in range(Z)])
            np.testing.assert_allclose(out["exposure_xy"][i, p], (w[:, None] * tr[:, :2]).sum(0) / w.sum(),
                                       atol=2e-4)
            np.testing.assert_allclose(out["exposure_z_um"][i, p], (w * tr[:, 2]).sum() / w.sum(), atol=2e-5)
            np.testing.assert_allclose(out["exposure_t_s"][i, p], (w * t).sum() / w.sum(), rtol=1e-6)


def test_stack_config_errors_name_the_field():
    from factory.errors import ConfigError
    from factory.config import parse_config

    with pytest.raises(ConfigError, match=r"stack.z_step_um"):
        parse_config({"seed": 1, "datasets": {"s": {"n_stacks": 2, "stack": {"n_planes": 3, "z_step_um": 0}}}})
    with pytest.raises(ConfigError, match="movies or stacks"):
        parse_config({"seed": 1, "datasets": {"s": {"n_images": 4, "movie": {"n_frames": 2},
                                                    "stack": {"n_planes": 3, "z_step_um": 0.5}}}})
    with pytest.raises(ConfigError, match="n_stacks needs a stack"):
        parse_config({"seed": 1, "datasets": {"s": {"n_stacks": 2}}})
