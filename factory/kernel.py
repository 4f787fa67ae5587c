"""The simulation kernel: laser and particles walked jointly at the dwell time step.

For every image (in parallel) the kernel seeds the image's own stream, draws the
particles (count, D, N_qd, start), then walks the scan in time order.  At each pixel
(and each sub-step of its dwell) the laser sits at its current position and every
particle contributes Eq. 1; the particles then take a Brownian step of one sub-dwell,
plus the retrace time after the last pixel of a line.  The per-pixel expectation is
the mean of Eq. 1 over the dwell's sub-steps; noise is drawn last.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .config import Dataset, FixedCount, FixedStart, FixedZ, NormalZ, PMTDetector, Uniform, UniformZ
from .detector import PMT, POISSON, record
from .motion import brownian_step
from .psf import eq1_amplitude, eq1_signal
from .rng import STATE_SIZE, dataset_key, normal, poisson, seed_state, uniform
from .scan import FrameSchedule, frame_schedule

# Distribution codes understood by the kernel.
FIXED, UNIFORM, NORMAL, POISSON_COUNT = 0, 1, 2, 3


class KernelParams(NamedTuple):
    height: int
    width: int
    pixel_size_um: float
    dwell_s: float
    substeps: int
    sigma_xy_um: float
    sigma_z_um: float
    focal_z_um: float
    n_bkg: float
    count_mode: int
    count_value: float  # fixed n, or Poisson mean
    max_particles: int
    d_mode: int
    d_low: float
    d_high: float
    nqd_mode: int
    nqd_low: float
    nqd_high: float
    start_mode: int  # UNIFORM within margin, or FIXED
    margin_px: float
    start_x_px: float
    start_y_px: float
    z_mode: int
    z_a: float  # fixed value / low / mean
    z_b: float  # high / std
    detector: int
    gain: float
    gamma_shape: float
    offset: float


def _dist(d) -> tuple[int, float, float]:
    if isinstance(d, Uniform):
        return UNIFORM, d.low, d.high
    return FIXED, d.value, d.value


def kernel_params(ds: Dataset) -> KernelParams:
    """Flatten a validated dataset config into the kernel's scalar parameters."""
    p = ds.particles
    d_mode, d_low, d_high = _dist(p.diffusion_um2_s)
    q_mode, q_low, q_high = _dist(p.n_qd)
    if isinstance(p.count, FixedCount):
        count_mode, count_value = FIXED, float(p.count.n)
    else:
        count_mode, count_value = POISSON_COUNT, p.count.mean
    if isinstance(p.xy_start, FixedStart):
        start = (FIXED, 0.0, p.xy_start.x_px, p.xy_start.y_px)
    else:
        start = (UNIFORM, p.xy_start.margin_px, 0.0, 0.0)
    z = p.z_start_um
    if isinstance(z, FixedZ):
        zs = (FIXED, z.value, z.value)
    elif isinstance(z, UniformZ):
        zs = (UNIFORM, z.low, z.high)
    else:
        assert isinstance(z, NormalZ)
        zs = (NORMAL, z.mean, z.std)
    det = ds.detector
    if isinstance(det, PMTDetector):
        detector = (PMT, det.gain_adu_per_photon, 1.0 / (det.excess_noise_factor - 1.0), det.offset_adu)
    else:
        detector = (POISSON, 1.0, 1.0, 0.0)
    return KernelParams(
        ds.image.height_px, ds.image.width_px, ds.image.pixel_size_um,
        ds.scan.dwell_us * 1e-6, ds.scan.substeps_per_dwell,
        ds.psf.sigma_xy_um, ds.psf.sigma_z_um, ds.psf.focal_z_um, ds.background.n_bkg,
        count_mode, count_value, p.max_particles,
        d_mode, d_low, d_high, q_mode, q_low, q_high,
        *start, *zs, *detector,
    )


@njit(inline="always", cache=True)
def _draw(state, mode, a, b):
    if mode == UNIFORM:
        return a + (b - a) * uniform(state)
    if mode == NORMAL:
        return a + b * normal(state)
    return a


@njit(parallel=True, nogil=True, cache=True)
def simulate_batch(k, rows, cols, directions, dt_after_s, key, first_index, images, expected,
                   trajectories, centroids, n_particles, diffusion, n_qd, want_expected, want_traj):
    """Fill the batch arrays with images ``first_index .. first_index + len(images) - 1``.

    ``rows, cols, directions, dt_after_s`` are the frame's scan schedule
    (``scan.frame_schedule``).  Arrays (B = batch size, P = max particles, T = H * W):
    images (B, H, W) uint16, expected (B, H, W) float32 (or (1, 1, 1) when not wanted),
    trajectories (B, P, T, 3) float32 (or (1, 1, 1, 3)), centroids (B, P, 2) float32,
    n_particles (B,) int32, diffusion and n_qd (B, P) float32.
    """
    B = images.shape[0]
    H, W = k.height, k.width
    P = k.max_particles
    S = k.substeps
    T = H * W
    px = k.pixel_size_um
    dt_sub = k.dwell_s / S
    for b in prange(B):
        state = np.empty(STATE_SIZE, np.uint64)
        seed_state(key, first_index + b, state)
        pos = np.zeros((P, 3))
        amp = np.zeros(P)
        dcoef = np.zeros(P)
        acc = np.zeros((P, 3))
        sums = np.zeros((P, 2))

        # Particles: count, then each one's D, brightness and start.
        if k.count_mode == POISSON_COUNT:
            n = poisson(state, k.count_value)
            if n > P:
                n = P
        else:
            n = int(k.count_value)
        n_particles[b] = n
        for p in range(P):
            centroids[b, p, 0] = np.nan
            centroids[b, p, 1] = np.nan
            diffusion[b, p] = np.nan
            n_qd[b, p] = np.nan
        for p in range(n):
            dcoef[p] = _draw(state, k.d_mode, k.d_low, k.d_high)
            q = _draw(state, k.nqd_mode, k.nqd_low, k.nqd_high)
            amp[p] = eq1_amplitude(q, k.sigma_xy_um, k.sigma_z_um)
            diffusion[b, p] = dcoef[p]
            n_qd[b, p] = q
            if k.start_mode == FIXED:
                pos[p, 0] = k.start_x_px
                pos[p, 1] = k.start_y_px
            else:
                pos[p, 0] = k.margin_px + (W - 1 - 2.0 * k.margin_px) * uniform(state)
                pos[p, 1] = k.margin_px + (H - 1 - 2.0 * k.margin_px) * uniform(state)
            pos[p, 2] = _draw(state, k.z_mode, k.z_a, k.z_b)

        # The joint walk, in the order the pixels are recorded.
        for t in range(T):
            row, col, direction = rows[t], cols[t], directions[t]
            signal = 0.0
            for p in range(n):
                acc[p, 0] = 0.0
                acc[p, 1] = 0.0
                acc[p, 2] = 0.0
            for s in range(S):
                # Sub-step centres sweep across the pixel in the scan direction.
                lx = col + direction * ((s + 0.5) / S - 0.5)
                for p in range(n):
                    signal += eq1_signal(
                        amp[p], (pos[p, 0] - lx) * px, (pos[p, 1] - row) * px,
                        pos[p, 2] - k.focal_z_um, k.sigma_xy_um, k.sigma_z_um,
                    )
                    acc[p, 0] += pos[p, 0]
                    acc[p, 1] += pos[p, 1]
                    acc[p, 2] += pos[p, 2]
                if t < T - 1 or s < S - 1:
                    dt = dt_sub
                    if s == S - 1:
                        dt += dt_after_s[t]
                    for p in range(n):
                        brownian_step(state, pos, p, dcoef[p], dt, px)
            lam = k.n_bkg + signal / S
            if want_expected:
                expected[b, row, col] = lam
            images[b, row, col] = record(state, lam, k.detector, k.gain, k.gamma_shape, k.offset)
            for p in range(n):
                mx = acc[p, 0] / S
                my = acc[p, 1] / S
                sums[p, 0] += mx
                sums[p, 1] += my
                if want_traj:
                    trajectories[b, p, t, 0] = mx
                    trajectories[b, p, t, 1] = my
                    trajectories[b, p, t, 2] = acc[p, 2] / S
        if want_traj:
            for p in range(n, P):
                for t in range(T):
                    trajectories[b, p, t, 0] = np.nan
                    trajectories[b, p, t, 1] = np.nan
                    trajectories[b, p, t, 2] = np.nan
        for p in range(n):
            centroids[b, p, 0] = sums[p, 0] / T
            centroids[b, p, 1] = sums[p, 1] / T


def allocate_batch(k: KernelParams, n: int, want_expected: bool, want_traj: bool) -> dict:
    """Arrays for ``n`` images, named as in the stores."""
    H, W, P = k.height, k.width, k.max_particles
    return {
        "images": np.empty((n, H, W), np.uint16),
        "expected": np.empty((n, H, W) if want_expected else (1, 1, 1), np.float32),
        "trajectories": np.empty((n, P, H * W, 3) if want_traj else (1, 1, 1, 3), np.float32),
        "centroids": np.empty((n, P, 2), np.float32),
        "n_particles": np.empty(n, np.int32),
        "diffusion": np.empty((n, P), np.float32),
        "n_qd": np.empty((n, P), np.float32),
    }


def schedule_of(ds: Dataset) -> FrameSchedule:
    """The frame's scan schedule, from the validated config."""
    return frame_schedule(ds.image.height_px, ds.image.width_px, ds.scan.dwell_us,
                          ds.scan.line_retrace_ms, ds.scan.direction == "bidirectional")


def run_batch(k: KernelParams, s: FrameSchedule, key, first_index: int, arrays: dict,
              want_expected: bool, want_traj: bool) -> dict:
    """Run the kernel over preallocated ``arrays``; returns the arrays that were filled."""
    simulate_batch(
        k, s.row, s.col, s.direction, s.dt_after_s, np.uint64(key), np.int64(first_index), arrays["images"], arrays["expected"],
        arrays["trajectories"], arrays["centroids"], arrays["n_particles"],
        arrays["diffusion"], arrays["n_qd"], want_expected, want_traj,
    )
    out = dict(arrays)
    if not want_expected:
        out.pop("expected")
    if not want_traj:
        out.pop("trajectories")
    return out


def simulate(ds: Dataset, seed: int, start: int = 0, stop: int | None = None) -> dict:
    """Simulate images ``start .. stop`` of dataset ``ds`` in memory (tests, notebooks)."""
    stop = ds.n_images if stop is None else stop
    k = kernel_params(ds)
    want_e, want_t = ds.output.expected, ds.output.trajectories
    arrays = allocate_batch(k, stop - start, want_e, want_t)
    return run_batch(k, schedule_of(ds), dataset_key(seed, ds.name), start, arrays, want_e, want_t)

