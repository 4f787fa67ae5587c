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

from .blinking import laws, on_probability, power_law_durations
from .config import (Dataset, FixedCount, FixedStart, FixedZ, LogUniform, NormalZ, PMTDetector, Uniform,
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
    if isinstance(dist, LogUniform):
        return np.exp(rng.uniform(np.log(dist.low), np.log(dist.high), size))
    return np.full(size, dist.value, np.float64)


def _draw_z(rng, dist, size) -> np.ndarray:
    if isinstance(dist, UniformZ):
        return rng.uniform(dist.low, dist.high, size)
    if isinstance(dist, NormalZ):
        return dist.mean + dist.std * rng.standard_normal(size)
    assert isinstance(dist, FixedZ)
    return np.full(size, dist.value, np.float64)


def laser_samples(ds: Dataset):
    """Laser x, y (px) and time (s, from the movie's start) of every sample of a movie.

    The samples (frame x pixel step x sub-step) come in time order; the row and column
    of every pixel step of a frame follow them: ``(x, y, t, row, col)``.

    With S sub-steps the laser sweeps the pixel along the scan direction: the samples sit
    at the centres of S equal parts of the pixel, each lasting dwell / S.  Frames follow
    each other every H W dwell + (H - 1) retrace + flyback.
    """
    scan, img = ds.scan, ds.image
    S, F = scan.substeps_per_dwell, ds.frames_per_movie
    H, W, dwell = img.height_px, img.width_px, scan.dwell_us * 1e-6
    sched = frame_schedule(H, W, scan.dwell_us, scan.line_retrace_ms, scan.direction == "bidirectional")
    frac = (np.arange(S) + 0.5) / S - 0.5
    lx = sched.col[:, None] + sched.direction[:, None] * frac[None, :]
    ly = np.broadcast_to(sched.row[:, None].astype(np.float64), lx.shape)
    t = sched.start_s[:, None] + np.arange(S)[None, :] * (dwell / S)
    # Written from the SPEC's frame period, not from the kernel's schedule.
    period = H * W * dwell + (H - 1) * scan.line_retrace_ms * 1e-3 + ds.flyback_ms * 1e-3
    t_all = (np.arange(F)[:, None] * period + t.reshape(1, -1)).reshape(-1)
    return np.tile(lx.reshape(-1), F), np.tile(ly.reshape(-1), F), t_all, sched.row, sched.col


def _fold(v, lo, hi):
    """Reflecting walls: the free walk folded into [lo, hi].

    Equal in law to reflecting every step, since the steps are symmetric.
    """
    span = hi - lo
    u = np.mod(v - lo, 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


def blink_states(spec, rng: np.random.Generator, shape: tuple, t: np.ndarray) -> np.ndarray:
    """Whether each of ``shape`` particles is on at the sample times ``t``.

    ``t`` is in s from the movie's start, increasing.  A renewal process per particle,
    its first period starting at 0 in the on state with probability
    ``blinking.on_probability``; returns a bool array of ``shape + (len(t),)``.
    """
    (a_on, t0, t1, c_on), (a_off, _, _, _) = laws(spec)
    on_law, off_law = (a_on, t0, t1, c_on or None), (a_off, t0, t1, None)
    first_on = rng.random(shape) < on_probability(spec)
    out = np.empty(shape + (len(t),), bool)
    for idx in np.ndindex(*shape):
        switches, now = [], 0.0
        while now <= t[-1]:
            # Blocks of an even number of periods, the first in the starting state.
            d = np.empty(128)
            d[0::2] = power_law_durations(rng, 64, *(on_law if first_on[idx] else off_law))
            d[1::2] = power_law_durations(rng, 64, *(off_law if first_on[idx] else on_law))
            switches.append(now + np.cumsum(d))
            now = switches[-1][-1]
        flips = np.searchsorted(np.concatenate(switches), t, side="right")  # switches at or before t
        out[idx] = first_on[idx] ^ (flips % 2 == 1)
    return out


def plane_z_um(ds: Dataset) -> np.ndarray:
    """Focal z (um) of each frame of a stream.

    A stack's planes (centred on the PSF's focal plane unless ``first_plane_um`` is
    given), else the focal plane for every frame.
    """
    st, F = ds.stack, ds.frames_per_movie
    if st is None:
        return np.full(F, ds.psf.focal_z_um)
    first = st.first_plane_um if st.first_plane_um is not None else ds.psf.focal_z_um - (F - 1) * st.z_step_um / 2
    return first + np.arange(F) * st.z_step_um


def simulate_numpy(ds: Dataset, n: int, rng: np.random.Generator) -> dict:
    """Simulate ``n`` frames (whole movies) of ``ds``, or ``n`` stacks, with NumPy.

    Vectorised over movies, particles and time; returns the store's rows (as
    ``factory.simulate`` does), drawn from ``rng``.  ValueError when ``n`` frames are
    not whole movies.
    """
    H, W = ds.image.height_px, ds.image.width_px
    px = ds.image.pixel_size_um
    S, F = ds.scan.substeps_per_dwell, ds.frames_per_movie
    p, psf = ds.particles, ds.psf
    P = p.max_particles
    T = H * W
    stack = ds.stack is not None
    if n % F and not stack:
        raise ValueError(f"{n} frames are not whole movies of {F}")
    nm = n if stack else n // F
    n = nm * F  # frames
    if isinstance(p.count, FixedCount):
        counts = np.full(nm, p.count.n)
    else:
        counts = np.minimum(rng.poisson(p.count.mean, nm), P)
    present = np.arange(P)[None, :] < counts[:, None]
    D = _draw(rng, p.diffusion_um2_s, (nm, P))
    nqd = _draw(rng, p.n_qd, (nm, P))
    margin = ds.movie.margin_um / px if ds.movie is not None else 0.0
    lo_x, hi_x, lo_y, hi_y = -0.5 - margin, W - 0.5 + margin, -0.5 - margin, H - 0.5 + margin
    if isinstance(p.xy_start, FixedStart):
        x0 = np.full((nm, P), p.xy_start.x_px)
        y0 = np.full((nm, P), p.xy_start.y_px)
    elif ds.movie is not None:  # uniform over the whole region of the movie
        x0 = rng.uniform(lo_x, hi_x, (nm, P))
        y0 = rng.uniform(lo_y, hi_y, (nm, P))
    else:
        m = p.xy_start.margin_px
        x0 = m + (W - 1 - 2 * m) * rng.random((nm, P))
        y0 = m + (H - 1 - 2 * m) * rng.random((nm, P))
    z0 = _draw_z(rng, p.z_start_um, (nm, P))

    # Random walk: steps between consecutive samples, N(0, 2 D dt) per axis.
    lx, ly, t, row, col = laser_samples(ds)
    dt = np.diff(t)  # (F*T*S - 1,)
    std_um = np.sqrt(2.0 * D[:, :, None] * dt[None, None, :])
    steps = rng.standard_normal((nm, P, F * T * S - 1, 3)) * std_um[..., None]
    steps[..., :2] /= px
    start = np.stack([x0, y0, z0], axis=-1)[:, :, None, :]
    pos = np.concatenate([start, start + np.cumsum(steps, axis=2)], axis=2)  # (nm, P, F*T*S, 3)
    if ds.movie is not None:
        pos[..., 0] = _fold(pos[..., 0], lo_x, hi_x)
        pos[..., 1] = _fold(pos[..., 1], lo_y, hi_y)

    amp = _amplitude(nqd, psf.sigma_xy_um, psf.sigma_z_um)
    own = _signal(amp[..., None], (pos[..., 0] - lx) * px, (pos[..., 1] - ly) * px,
                  pos[..., 2] - np.repeat(plane_z_um(ds), T * S), psf.sigma_xy_um, psf.sigma_z_um)
    own = np.where(present[..., None], own, 0.0)  # (nm, P, F*T*S): each particle's signal
    on = None
    if p.blinking is not None:  # from a stream of its own: every other draw stays as it is
        on = blink_states(p.blinking, rng.spawn(1)[0], (nm, P), t)
        own = np.where(on, own, 0.0)
    signal = own.sum(axis=1)
    lam_t = ds.background.n_bkg + signal.reshape(nm * F, T, S).mean(axis=2)
    expected = np.empty((n, H, W))
    expected[:, row, col] = lam_t

    # Exposure-weighted position and time per frame: weights = each particle's own signal.
    w = own.reshape(nm, P, F, T * S)
    wsum = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ex = (w * pos[..., 0].reshape(nm, P, F, T * S)).sum(-1) / wsum
        ey = (w * pos[..., 1].reshape(nm, P, F, T * S)).sum(-1) / wsum
        et = (w * t.reshape(F, T * S)[None, None]).sum(-1) / wsum
    exposure = np.stack([ex, ey], -1).transpose(0, 2, 1, 3).reshape(n, P, 2)
    exposure_t = et.transpose(0, 2, 1).reshape(n, P)
    exposure = np.where(present.repeat(F, 0)[..., None], exposure, np.nan)
    exposure_t = np.where(present.repeat(F, 0), exposure_t, np.nan)

    counts_img = rng.poisson(expected)
    det = ds.detector
    if isinstance(det, PMTDetector):
        # Each photon's gain ~ Gamma(k, g / k) with k = 1 / (F - 1): the sum of n gains is
        # Gamma(n k, g / k).
        shape = 1.0 / (det.excess_noise_factor - 1.0)
        gains = np.where(counts_img > 0, rng.gamma(np.maximum(counts_img * shape, 1e-300)), 0.0)
        adu = det.offset_adu + gains * det.gain_adu_per_photon / shape
        if det.read_noise_adu > 0:
            adu = adu + det.read_noise_adu * rng.standard_normal(adu.shape)
        images = np.maximum(np.floor(adu + 0.5), 0.0)
    else:
        images = counts_img.astype(np.float64)
    images = np.minimum(images, UINT16_MAX).astype(np.uint16)
    if stack:
        out = _stack_truth(ds, images, expected, pos, own, t, present, counts, D, nqd)
        if on is not None:
            out["on_fraction"] = np.where(present, on.mean(-1), np.nan).astype(np.float32)
        return out

    # Per frame: (n, P, T, 3) with frames of a movie consecutive, as the stores hold them;
    # the store keeps every ``trajectory_stride``-th pixel step of it (the centroids use all).
    traj = pos.reshape(nm, P, F, T, S, 3).mean(axis=4).transpose(0, 2, 1, 3, 4).reshape(n, P, T, 3)
    pres = present.repeat(F, 0)
    traj[~pres] = np.nan
    centroids = traj[..., :2].mean(axis=2)
    in_view = pres & (centroids[..., 0] >= -0.5) & (centroids[..., 0] < W - 0.5) \
        & (centroids[..., 1] >= -0.5) & (centroids[..., 1] < H - 0.5)
    period = t[T * S] if F > 1 else 0.0
    blinking = {} if on is None else {"on_fraction": np.where(
        pres, on.reshape(nm, P, F, T * S).mean(-1).transpose(0, 2, 1).reshape(n, P), np.nan).astype(np.float32)}
    return {
        **blinking,
        "images": images,
        "expected": expected.astype(np.float32),
        "trajectories": traj[:, :, ::ds.trajectory_stride].astype(np.float32),
        "centroids": centroids.astype(np.float32),
        "n_particles": counts.repeat(F).astype(np.int32),
        "diffusion": np.where(pres, D.repeat(F, 0), np.nan).astype(np.float32),
        "n_qd": np.where(pres, nqd.repeat(F, 0), np.nan).astype(np.float32),
        "exposure_xy": exposure.astype(np.float32),
        "exposure_t_s": exposure_t,
        "in_view": in_view.astype(np.uint8),
        "frame_start_s": np.tile(np.arange(F) * period, nm),
    }


def _stack_truth(ds: Dataset, images, expected, pos, own, t, present, counts, D, nqd) -> dict:
    """Stack rows computed over the whole stack's samples at once.

    The kernel combines per-plane sums instead.
    """
    H, W = ds.image.height_px, ds.image.width_px
    F, S = ds.frames_per_movie, ds.scan.substeps_per_dwell
    nm, P = present.shape
    traj = pos.reshape(nm, P, -1, S, 3).mean(axis=3)  # (nm, P, F * T, 3), time order
    traj[~present] = np.nan
    cen = traj.mean(axis=2)
    wsum = own.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ex = (own[..., None] * pos).sum(2) / wsum[..., None]
        et = (own * t[None, None]).sum(-1) / wsum
    in_view = present & (cen[..., 0] >= -0.5) & (cen[..., 0] < W - 0.5) & (cen[..., 1] >= -0.5) & (cen[..., 1] < H - 0.5)
    period = H * W * ds.scan.dwell_us * 1e-6 + (H - 1) * ds.scan.line_retrace_ms * 1e-3 + ds.flyback_ms * 1e-3
    nan = lambda a: np.where(present[..., None] if a.ndim == 3 else present, a, np.nan)
    return {
        "images": images.reshape(nm, F, H, W),
        "expected": expected.reshape(nm, F, H, W).astype(np.float32),
        "trajectories": traj[:, :, ::ds.trajectory_stride].astype(np.float32),
        "centroids": cen[..., :2].astype(np.float32),
        "centroid_z_um": cen[..., 2].astype(np.float32),
        "n_particles": counts.astype(np.int32),
        "diffusion": nan(D).astype(np.float32),
        "n_qd": nan(nqd).astype(np.float32),
        "exposure_xy": nan(ex[..., :2]).astype(np.float32),
        "exposure_z_um": nan(ex[..., 2]).astype(np.float32),
        "exposure_t_s": nan(et),
        "in_view": in_view.astype(np.uint8),
        "plane_start_s": np.tile(np.arange(F) * period, (nm, 1)),
        "plane_z_um": np.tile(plane_z_um(ds), (nm, 1)).astype(np.float32),
    }
