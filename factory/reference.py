"""A plain NumPy implementation of the same physics as the kernel.

It is the yardstick the benchmark compares the kernel against, and a second engine the
physics-law tests run on.  It reads the validated config itself (not the kernel's
flattened parameters), so a mistake in that mapping shows up as a disagreement between
the two engines.  It uses NumPy's Generator, so its images are statistically, not
bitwise, equal to the kernel's; with D = 0 and a fixed start its expectation is
deterministic and equals the kernel's.
"""

from __future__ import annotations

import numpy as np

from .config import (Dataset, FixedCount, FixedStart, FixedZ, NormalZ, PMTDetector, Uniform,
                     UniformZ)
from .detector import UINT16_MAX
from .psf import eq1_amplitude, eq1_signal
from .scan import frame_schedule

# Eq. 1 as plain Python over NumPy arrays (the kernel compiles the same functions).
_amplitude, _signal = eq1_amplitude.py_func, eq1_signal.py_func


def _draw(rng, dist, size) -> np.ndarray:
    """Draw from a D / N_qd distribution of the config."""
    if isinstance(dist, Uniform):
        return rng.uniform(dist.low, dist.high, size)
    return np.full(size, dist.value, np.float64)


def _draw_z(rng, dist, size) -> np.ndarray:
    if isinstance(dist, UniformZ):
        return rng.uniform(dist.low, dist.high, size)
    if isinstance(dist, NormalZ):
        return dist.mean + dist.std * rng.standard_normal(size)
    assert isinstance(dist, FixedZ)
    return np.full(size, dist.value, np.float64)


def laser_samples(ds: Dataset):
    """Laser x, y (px) and time (s) of every sample (pixel step x sub-step), in time order,
    and the (row, col) of every pixel step.

    With S sub-steps the laser sweeps the pixel along the scan direction: the samples sit
    at the centres of S equal parts of the pixel, each lasting dwell / S."""
    scan, img = ds.scan, ds.image
    S = scan.substeps_per_dwell
    sched = frame_schedule(img.height_px, img.width_px, scan.dwell_us, scan.line_retrace_ms,
                           scan.direction == "bidirectional")
    frac = (np.arange(S) + 0.5) / S - 0.5
    lx = sched.col[:, None] + sched.direction[:, None] * frac[None, :]
    ly = np.broadcast_to(sched.row[:, None].astype(np.float64), lx.shape)
    t = sched.start_s[:, None] + np.arange(S)[None, :] * (scan.dwell_us * 1e-6 / S)
    return lx.reshape(-1), ly.reshape(-1), t.reshape(-1), sched.row, sched.col


def simulate_numpy(ds: Dataset, n: int, rng: np.random.Generator) -> dict:
    """Simulate ``n`` images of ``ds``, vectorised over images, particles and time."""
    H, W = ds.image.height_px, ds.image.width_px
    px = ds.image.pixel_size_um
    S = ds.scan.substeps_per_dwell
    p, psf = ds.particles, ds.psf
    P = p.max_particles
    T = H * W
    if isinstance(p.count, FixedCount):
        counts = np.full(n, p.count.n)
    else:
        counts = np.minimum(rng.poisson(p.count.mean, n), P)
    present = np.arange(P)[None, :] < counts[:, None]
    D = _draw(rng, p.diffusion_um2_s, (n, P))
    nqd = _draw(rng, p.n_qd, (n, P))
    if isinstance(p.xy_start, FixedStart):
        x0 = np.full((n, P), p.xy_start.x_px)
        y0 = np.full((n, P), p.xy_start.y_px)
    else:
        m = p.xy_start.margin_px
        x0 = m + (W - 1 - 2 * m) * rng.random((n, P))
        y0 = m + (H - 1 - 2 * m) * rng.random((n, P))
    z0 = _draw_z(rng, p.z_start_um, (n, P))

    # Random walk: steps between consecutive samples, N(0, 2 D dt) per axis.
    lx, ly, t, row, col = laser_samples(ds)
    dt = np.diff(t)  # (T*S - 1,)
    std_um = np.sqrt(2.0 * D[:, :, None] * dt[None, None, :])  # (n, P, T*S-1)
    steps = rng.standard_normal((n, P, T * S - 1, 3)) * std_um[..., None]
    steps[..., :2] /= px
    start = np.stack([x0, y0, z0], axis=-1)[:, :, None, :]
    pos = np.concatenate([start, start + np.cumsum(steps, axis=2)], axis=2)  # (n, P, T*S, 3)

    amp = _amplitude(nqd, psf.sigma_xy_um, psf.sigma_z_um)
    signal = _signal(amp[..., None], (pos[..., 0] - lx) * px, (pos[..., 1] - ly) * px,
                        pos[..., 2] - psf.focal_z_um, psf.sigma_xy_um, psf.sigma_z_um)
    signal = np.where(present[..., None], signal, 0.0).sum(axis=1)  # (n, T*S)
    lam_t = ds.background.n_bkg + signal.reshape(n, T, S).mean(axis=2)
    expected = np.empty((n, H, W))
    expected[:, row, col] = lam_t

    counts_img = rng.poisson(expected)
    det = ds.detector
    if isinstance(det, PMTDetector):
        # Each photon's gain ~ Gamma(k, g / k) with k = 1 / (F - 1): the sum of n gains is
        # Gamma(n k, g / k).
        shape = 1.0 / (det.excess_noise_factor - 1.0)
        gains = np.where(counts_img > 0, rng.gamma(np.maximum(counts_img * shape, 1e-300)), 0.0)
        images = np.floor(det.offset_adu + gains * det.gain_adu_per_photon / shape + 0.5)
    else:
        images = counts_img.astype(np.float64)
    images = np.minimum(images, UINT16_MAX).astype(np.uint16)

    traj = pos.reshape(n, P, T, S, 3).mean(axis=3)
    traj[~present] = np.nan
    centroids = traj[..., :2].mean(axis=2)
    return {
        "images": images,
        "expected": expected.astype(np.float32),
        "trajectories": traj.astype(np.float32),
        "centroids": centroids.astype(np.float32),
        "n_particles": counts.astype(np.int32),
        "diffusion": np.where(present, D, np.nan).astype(np.float32),
        "n_qd": np.where(present, nqd, np.nan).astype(np.float32),
    }
