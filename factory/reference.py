"""A plain NumPy implementation of the same physics as the kernel.

It is the yardstick the benchmark compares the kernel against, and a second engine the
physics-law tests run on.  It uses NumPy's Generator, so its images are statistically,
not bitwise, equal to the kernel's; with D = 0 and a fixed start its expectation is
deterministic and equals the kernel's.
"""

from __future__ import annotations

import numpy as np

from .detector import PMT, UINT16_MAX
from .kernel import FIXED, NORMAL, POISSON_COUNT, UNIFORM, KernelParams


def _draw(rng, mode, a, b, size):
    if mode == UNIFORM:
        return rng.uniform(a, b, size)
    if mode == NORMAL:
        return a + b * rng.standard_normal(size)
    return np.full(size, a, np.float64)


def sample_times_s(k: KernelParams) -> np.ndarray:
    """Time of every laser sample (pixel step x sub-step), in time order."""
    T, S = k.height * k.width, k.substeps
    t = np.arange(T)
    sub = np.arange(S)
    line = k.width * k.dwell_s + k.retrace_s
    base = (t // k.width) * line + (t % k.width) * k.dwell_s
    return (base[:, None] + sub[None, :] * k.dwell_s / S).reshape(-1)


def laser_positions(k: KernelParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Laser (x, y) in px at every sample, and the (row, col) of every pixel step."""
    T, S, W = k.height * k.width, k.substeps, k.width
    t = np.arange(T)
    row = t // W
    kk = t % W
    reverse = k.bidirectional & (row % 2 == 1)
    col = np.where(reverse, W - 1 - kk, kk)
    direction = np.where(reverse, -1.0, 1.0)
    frac = (np.arange(S) + 0.5) / S - 0.5
    lx = col[:, None] + direction[:, None] * frac[None, :]
    ly = np.broadcast_to(row[:, None], lx.shape)
    return lx.reshape(-1), ly.reshape(-1).astype(np.float64), row, col


def simulate_numpy(k: KernelParams, n: int, rng: np.random.Generator) -> dict:
    """Simulate ``n`` images, vectorised over images, particles and time."""
    H, W, P, S = k.height, k.width, k.max_particles, k.substeps
    T = H * W
    if k.count_mode == POISSON_COUNT:
        counts = np.minimum(rng.poisson(k.count_value, n), P)
    else:
        counts = np.full(n, int(k.count_value))
    present = np.arange(P)[None, :] < counts[:, None]
    D = _draw(rng, k.d_mode, k.d_low, k.d_high, (n, P))
    nqd = _draw(rng, k.nqd_mode, k.nqd_low, k.nqd_high, (n, P))
    if k.start_mode == FIXED:
        x0 = np.full((n, P), k.start_x_px)
        y0 = np.full((n, P), k.start_y_px)
    else:
        x0 = k.margin_px + (W - 1 - 2 * k.margin_px) * rng.random((n, P))
        y0 = k.margin_px + (H - 1 - 2 * k.margin_px) * rng.random((n, P))
    z0 = _draw(rng, k.z_mode, k.z_a, k.z_b, (n, P))

    # Random walk: steps between consecutive samples, N(0, 2 D dt) per axis.
    dt = np.diff(sample_times_s(k))  # (T*S - 1,)
    std_um = np.sqrt(2.0 * D[:, :, None] * dt[None, None, :])  # (n, P, T*S-1)
    steps = rng.standard_normal((n, P, T * S - 1, 3)) * std_um[..., None]
    steps[..., :2] /= k.pixel_size_um
    start = np.stack([x0, y0, z0], axis=-1)[:, :, None, :]
    pos = np.concatenate([start, start + np.cumsum(steps, axis=2)], axis=2)  # (n, P, T*S, 3)

    lx, ly, row, col = laser_positions(k)
    amp = nqd / (2 * np.pi * k.sigma_xy_um**2) / (np.sqrt(2 * np.pi) * k.sigma_z_um)
    r2 = ((pos[..., 0] - lx) ** 2 + (pos[..., 1] - ly) ** 2) * k.pixel_size_um**2
    dz2 = (pos[..., 2] - k.focal_z_um) ** 2
    signal = amp[..., None] * np.exp(-r2 / (2 * k.sigma_xy_um**2) - dz2 / (2 * k.sigma_z_um**2))
    signal = np.where(present[..., None], signal, 0.0).sum(axis=1)  # (n, T*S)
    lam_t = k.n_bkg + signal.reshape(n, T, S).mean(axis=2)
    expected = np.empty((n, H, W))
    expected[:, row, col] = lam_t

    counts_img = rng.poisson(expected)
    if k.detector == PMT:
        shape = k.gamma_shape
        gains = np.where(counts_img > 0, rng.gamma(np.maximum(counts_img * shape, 1e-300)), 0.0)
        images = np.floor(k.offset + gains * k.gain / shape + 0.5)
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
