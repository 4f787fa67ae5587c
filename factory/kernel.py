"""The simulation kernel: laser and particles walked jointly at the dwell time step.

For every movie (in parallel; an independent image is a movie of one frame) the kernel
seeds the movie's own stream, draws the particles (count, D, N_qd, start), then walks
the scan of each frame in time order.  At each pixel (and each sub-step of its dwell)
the laser sits at its current position and every particle contributes Eq. 1; the
particles then take a Brownian step of one sub-dwell, plus the retrace time after the
last pixel of a line, plus the flyback after the last pixel of a frame.  The per-pixel
expectation is the mean of Eq. 1 over the dwell's sub-steps; noise is drawn last.

Per frame and particle the kernel also accumulates the trajectory centroid (the mean
position over the frame's pixel steps) and the exposure-weighted position and time
(weighted by the particle's own Eq. 1 signal at each sample: what the laser saw, and
when).  In movies the particles live in a region larger than the field, with
reflecting walls.  Blinking particles (``particles.blinking``, ``factory.blinking``)
switch on and off at times drawn from streams of their own; an off particle adds
neither signal nor exposure weight.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .blinking import laws, on_probability, power_law_duration
from .config import Dataset, FixedCount, FixedStart, FixedZ, LogUniform, NormalZ, PMTDetector, Uniform, UniformZ
from .detector import PMT, POISSON, record
from .motion import brownian_step
from .psf import eq1_amplitude, eq1_signal
from .rng import STATE_SIZE, dataset_key, normal, poisson, seed_state, substream_key, uniform
from .scan import FrameSchedule, frame_period_s, frame_schedule
from .stacks import as_rows

# Distribution codes understood by the kernel.
FIXED, UNIFORM, NORMAL, POISSON_COUNT, REGION, LOG_UNIFORM = 0, 1, 2, 3, 4, 5
# Blinking streams per movie: particle p of movie m draws its on / off durations from
# stream m * BLINK_STREAMS + p of the blinking key (the schema's particle limit).
BLINK_STREAMS = 4096


class KernelParams(NamedTuple):
    """A dataset's settings as the kernel's scalars (``kernel_params``): lengths in px or um, times in s."""

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
    read_noise: float  # ADU, standard deviation (0: none)
    n_frames: int  # frames per movie (1: independent images)
    frame_period_s: float
    walls: bool  # reflecting walls at the region's edges (movies)
    region_x0: float  # region in px (pixel-centre origin)
    region_x1: float
    region_y0: float
    region_y1: float
    first_plane_um: float  # focal z of frame 0 of a stream (psf.focal_z_um but in stacks)
    plane_step_um: float  # focal z step from one frame to the next (0 but in stacks)
    traj_stride: int  # pixel steps between stored trajectory samples (1 dwell, W line, H W frame)
    blinking: bool  # particles blink (particles.blinking); the rest below is unused otherwise
    p_on_start: float
    on_alpha: float
    on_cutoff_s: float  # 0: none
    off_alpha: float
    blink_t_min_s: float
    blink_t_max_s: float


def _dist(d) -> tuple[int, float, float]:
    if isinstance(d, Uniform):
        return UNIFORM, d.low, d.high
    if isinstance(d, LogUniform):
        return LOG_UNIFORM, d.low, d.high
    return FIXED, d.value, d.value


def _blinking(ds: Dataset) -> tuple:
    b = ds.particles.blinking
    if b is None:
        return (False, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0)
    (a_on, t_min, t_max, cutoff), (a_off, _, _, _) = laws(b)
    return (True, on_probability(b), a_on, cutoff, a_off, t_min, t_max)


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
    elif ds.movie is not None:
        start = (REGION, 0.0, 0.0, 0.0)
    else:
        start = (UNIFORM, p.xy_start.margin_px, 0.0, 0.0)
    h, w, px = ds.image.height_px, ds.image.width_px, ds.image.pixel_size_um
    m_px = ds.movie.margin_um / px if ds.movie is not None else 0.0
    sched = schedule_of(ds)
    planes = ds.plane_z_um
    movie = (ds.frames_per_movie, frame_period_s(sched), ds.movie is not None,
             -0.5 - m_px, w - 0.5 + m_px, -0.5 - m_px, h - 0.5 + m_px,
             planes[0], ds.stack.z_step_um if ds.stack is not None else 0.0, ds.trajectory_stride)
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
        detector = (PMT, det.gain_adu_per_photon, 1.0 / (det.excess_noise_factor - 1.0), det.offset_adu,
                    det.read_noise_adu)
    else:
        detector = (POISSON, 1.0, 1.0, 0.0, 0.0)
    return KernelParams(
        ds.image.height_px, ds.image.width_px, ds.image.pixel_size_um,
        ds.scan.dwell_us * 1e-6, ds.scan.substeps_per_dwell,
        ds.psf.sigma_xy_um, ds.psf.sigma_z_um, ds.psf.focal_z_um, ds.background.n_bkg,
        count_mode, count_value, p.max_particles,
        d_mode, d_low, d_high, q_mode, q_low, q_high,
        *start, *zs, *detector, *movie, *_blinking(ds),
    )


@njit(inline="always", cache=True)
def _draw(state, mode, a, b):
    if mode == UNIFORM:
        return a + (b - a) * uniform(state)
    if mode == NORMAL:
        return a + b * normal(state)
    if mode == LOG_UNIFORM:
        return math.exp(math.log(a) + (math.log(b) - math.log(a)) * uniform(state))
    return a


@njit(inline="always", cache=True)
def _blink_duration(state, on, k):
    """How long the state just entered (on or off) lasts, s."""
    if on:
        return power_law_duration(state, k.on_alpha, k.blink_t_min_s, k.blink_t_max_s, k.on_cutoff_s)
    return power_law_duration(state, k.off_alpha, k.blink_t_min_s, k.blink_t_max_s, 0.0)


@njit(inline="always", cache=True)
def _reflect(v, lo, hi):
    """Fold a coordinate into [lo, hi] as reflecting walls do (any number of bounces)."""
    span = hi - lo
    u = (v - lo) % (2.0 * span)
    return lo + (u if u <= span else 2.0 * span - u)


@njit(parallel=True, nogil=True, cache=True)
def simulate_batch(k, rows, cols, directions, starts_s, dt_after_s, key, first_movie, images, expected,
                   trajectories, centroids, n_particles, diffusion, n_qd, exposure_xy, exposure_t_s,
                   in_view, frame_start_s, centroid_z_um, exposure_z_um, exposure_weight,
                   on_fraction, blink_key, noise_key, want_expected, want_traj):
    """Fill the batch arrays with the frames of movies ``first_movie ..``.

    One movie takes ``k.n_frames`` consecutive rows; an image is a movie of one frame.
    ``rows, cols, directions, starts_s, dt_after_s`` are the frame's scan schedule
    (``scan.frame_schedule``).  Arrays (B = frames in the batch, P = max particles,
    T = H * W): images (B, H, W) uint16, expected (B, H, W) float32 (or (1, 1, 1) when
    not wanted), trajectories (B, P, T / stride, 3) float32 (or (1, 1, 1, 3)), centroids and
    exposure_xy (B, P, 2) float32, n_particles (B,) int32, diffusion and n_qd (B, P)
    float32, exposure_t_s (B, P) float64 (from the movie's start), in_view (B, P) uint8,
    frame_start_s (B,) float64, centroid_z_um and exposure_z_um (B, P) float32, and
    exposure_weight (B, P) float64 (the frame's summed Eq. 1 signal of the particle, per
    sub-step: what combines a stack's planes).  Frame f of a stream images the focal
    plane ``first_plane_um + f * plane_step_um``.  Trajectories hold one sample every
    ``k.traj_stride`` pixel steps: the position at steps 0, stride, 2 stride, ... of
    each frame, the same values a stride of 1 stores there.

    Blinking (``k.blinking``): particle p's on / off state switches at times drawn from
    its own stream (``blink_key``, index movie * BLINK_STREAMS + p); at each sample an
    off particle adds no signal and no exposure weight.  The noise then comes from the
    movie's stream of ``noise_key``, while the motion stream still draws the noise of
    the image without blinking (and throws it away), so every position is the same with
    blinking on or off.  on_fraction (B, P) float32 (or (1, 1)) receives the
    fraction of the frame's samples at which the particle was on.
    """
    F = k.n_frames
    M = images.shape[0] // F
    H, W = k.height, k.width
    P = k.max_particles
    S = k.substeps
    T = H * W
    stride = k.traj_stride
    px = k.pixel_size_um
    dt_sub = k.dwell_s / S
    for m in prange(M):
        state = np.empty(STATE_SIZE, np.uint64)
        seed_state(key, first_movie + m, state)
        pos = np.zeros((P, 3))
        amp = np.zeros(P)
        dcoef = np.zeros(P)
        acc = np.zeros((P, 3))
        sums = np.zeros((P, 3))
        wsum = np.zeros((P, 5))  # weight, weight * x, weight * y, weight * t, weight * z
        on = np.ones(P, np.bool_)
        next_switch = np.full(P, np.inf)  # movie time (s) of each particle's next switch
        n_on = np.zeros(P, np.int64)  # samples on in the frame
        blink_state = np.empty((P, STATE_SIZE), np.uint64)
        noise = state
        if k.blinking:
            noise = np.empty(STATE_SIZE, np.uint64)
            seed_state(noise_key, first_movie + m, noise)

        # Particles: count, then each one's D, brightness and start.
        if k.count_mode == POISSON_COUNT:
            n = poisson(state, k.count_value)
            if n > P:
                n = P
        else:
            n = int(k.count_value)
        for p in range(n):
            dcoef[p] = _draw(state, k.d_mode, k.d_low, k.d_high)
            q = _draw(state, k.nqd_mode, k.nqd_low, k.nqd_high)
            amp[p] = eq1_amplitude(q, k.sigma_xy_um, k.sigma_z_um)
            for f in range(F):
                diffusion[m * F + f, p] = dcoef[p]
                n_qd[m * F + f, p] = q
            if k.start_mode == FIXED:
                pos[p, 0] = k.start_x_px
                pos[p, 1] = k.start_y_px
            elif k.start_mode == REGION:
                pos[p, 0] = k.region_x0 + (k.region_x1 - k.region_x0) * uniform(state)
                pos[p, 1] = k.region_y0 + (k.region_y1 - k.region_y0) * uniform(state)
            else:
                pos[p, 0] = k.margin_px + (W - 1 - 2.0 * k.margin_px) * uniform(state)
                pos[p, 1] = k.margin_px + (H - 1 - 2.0 * k.margin_px) * uniform(state)
            pos[p, 2] = _draw(state, k.z_mode, k.z_a, k.z_b)
            if k.blinking:
                bs = blink_state[p]
                seed_state(blink_key, (first_movie + m) * BLINK_STREAMS + p, bs)
                on[p] = uniform(bs) < k.p_on_start
                next_switch[p] = _blink_duration(bs, on[p], k)

        for f in range(F):
            b = m * F + f
            n_particles[b] = n
            frame_start_s[b] = f * k.frame_period_s
            focal_z = k.first_plane_um + f * k.plane_step_um
            for p in range(P):
                centroids[b, p, 0] = np.nan
                centroids[b, p, 1] = np.nan
                exposure_xy[b, p, 0] = np.nan
                exposure_xy[b, p, 1] = np.nan
                exposure_t_s[b, p] = np.nan
                centroid_z_um[b, p] = np.nan
                exposure_z_um[b, p] = np.nan
                exposure_weight[b, p] = 0.0
                in_view[b, p] = 0
                if p >= n:
                    diffusion[b, p] = np.nan
                    n_qd[b, p] = np.nan
                    if k.blinking:
                        on_fraction[b, p] = np.nan
            for p in range(n):
                sums[p, 0] = 0.0
                sums[p, 1] = 0.0
                sums[p, 2] = 0.0
                n_on[p] = 0
                for j in range(5):
                    wsum[p, j] = 0.0

            # The joint walk, in the order the pixels are recorded.
            for t in range(T):
                row, col, direction = rows[t], cols[t], directions[t]
                signal = 0.0
                signal_all = 0.0  # blinking: the signal were every particle on
                for p in range(n):
                    acc[p, 0] = 0.0
                    acc[p, 1] = 0.0
                    acc[p, 2] = 0.0
                for s in range(S):
                    # Sub-step centres sweep across the pixel in the scan direction.
                    lx = col + direction * ((s + 0.5) / S - 0.5)
                    ts = starts_s[t] + s * dt_sub
                    for p in range(n):
                        if k.blinking:
                            while frame_start_s[b] + ts >= next_switch[p]:
                                on[p] = not on[p]
                                next_switch[p] += _blink_duration(blink_state[p], on[p], k)
                        sig = eq1_signal(
                            amp[p], (pos[p, 0] - lx) * px, (pos[p, 1] - row) * px,
                            pos[p, 2] - focal_z, k.sigma_xy_um, k.sigma_z_um,
                        )
                        signal_all += sig
                        if on[p]:
                            n_on[p] += 1
                        else:
                            sig = 0.0
                        signal += sig
                        acc[p, 0] += pos[p, 0]
                        acc[p, 1] += pos[p, 1]
                        acc[p, 2] += pos[p, 2]
                        wsum[p, 0] += sig
                        wsum[p, 1] += sig * pos[p, 0]
                        wsum[p, 2] += sig * pos[p, 1]
                        wsum[p, 3] += sig * ts
                        wsum[p, 4] += sig * pos[p, 2]
                    if f < F - 1 or t < T - 1 or s < S - 1:
                        dt = dt_sub
                        if s == S - 1:
                            dt += dt_after_s[t]
                        for p in range(n):
                            brownian_step(state, pos, p, dcoef[p], dt, px)
                            if k.walls:
                                pos[p, 0] = _reflect(pos[p, 0], k.region_x0, k.region_x1)
                                pos[p, 1] = _reflect(pos[p, 1], k.region_y0, k.region_y1)
                lam = k.n_bkg + signal / S
                if want_expected:
                    expected[b, row, col] = lam
                if k.blinking:
                    # The motion stream takes the draws it takes without blinking (same
                    # lambda, same uniforms), so every position stays as it is then.
                    record(state, k.n_bkg + signal_all / S, k.detector, k.gain, k.gamma_shape, k.offset, k.read_noise)
                images[b, row, col] = record(noise, lam, k.detector, k.gain, k.gamma_shape, k.offset, k.read_noise)
                for p in range(n):
                    mx = acc[p, 0] / S
                    my = acc[p, 1] / S
                    sums[p, 0] += mx
                    sums[p, 1] += my
                    sums[p, 2] += acc[p, 2] / S
                    if want_traj and t % stride == 0:
                        trajectories[b, p, t // stride, 0] = mx
                        trajectories[b, p, t // stride, 1] = my
                        trajectories[b, p, t // stride, 2] = acc[p, 2] / S
            if want_traj:
                for p in range(n, P):
                    for t in range(T // stride):
                        trajectories[b, p, t, 0] = np.nan
                        trajectories[b, p, t, 1] = np.nan
                        trajectories[b, p, t, 2] = np.nan
            for p in range(n):
                cx = sums[p, 0] / T
                cy = sums[p, 1] / T
                centroids[b, p, 0] = cx
                centroids[b, p, 1] = cy
                centroid_z_um[b, p] = sums[p, 2] / T
                exposure_weight[b, p] = wsum[p, 0] / S
                if k.blinking:
                    on_fraction[b, p] = n_on[p] / (T * S)
                in_view[b, p] = -0.5 <= cx < W - 0.5 and -0.5 <= cy < H - 0.5
                if wsum[p, 0] > 0.0:
                    exposure_xy[b, p, 0] = wsum[p, 1] / wsum[p, 0]
                    exposure_xy[b, p, 1] = wsum[p, 2] / wsum[p, 0]
                    exposure_t_s[b, p] = frame_start_s[b] + wsum[p, 3] / wsum[p, 0]
                    exposure_z_um[b, p] = wsum[p, 4] / wsum[p, 0]


def allocate_batch(k: KernelParams, n: int, want_expected: bool, want_traj: bool) -> dict:
    """Arrays for ``n`` images, named as in the stores."""
    H, W, P = k.height, k.width, k.max_particles
    T = H * W // k.traj_stride  # trajectory samples per frame
    return {
        "images": np.empty((n, H, W), np.uint16),
        "expected": np.empty((n, H, W) if want_expected else (1, 1, 1), np.float32),
        "trajectories": np.empty((n, P, T, 3) if want_traj else (1, 1, 1, 3), np.float32),
        "centroids": np.empty((n, P, 2), np.float32),
        "n_particles": np.empty(n, np.int32),
        "diffusion": np.empty((n, P), np.float32),
        "n_qd": np.empty((n, P), np.float32),
        "exposure_xy": np.empty((n, P, 2), np.float32),
        "exposure_t_s": np.empty((n, P), np.float64),
        "in_view": np.empty((n, P), np.uint8),
        "frame_start_s": np.empty(n, np.float64),
        "centroid_z_um": np.empty((n, P), np.float32),
        "exposure_z_um": np.empty((n, P), np.float32),
        "exposure_weight": np.empty((n, P), np.float64),
        "on_fraction": np.empty((n, P) if k.blinking else (1, 1), np.float32),
    }


def schedule_of(ds: Dataset) -> FrameSchedule:
    """The frame's scan schedule, from the validated config."""
    return frame_schedule(ds.image.height_px, ds.image.width_px, ds.scan.dwell_us,
                          ds.scan.line_retrace_ms, ds.scan.direction == "bidirectional", ds.flyback_ms)


def run_batch(k: KernelParams, s: FrameSchedule, key, first_index: int, arrays: dict,
              want_expected: bool, want_traj: bool) -> dict:
    """Run the kernel over preallocated ``arrays``: whole movies from frame ``first_index`` on.

    Returns the arrays that were filled (``arrays`` without the placeholders of those
    not wanted: ``expected``, ``trajectories``, and ``on_fraction`` without blinking).
    Raises ValueError when the frames are not whole movies.
    """
    if first_index % k.n_frames or len(arrays["images"]) % k.n_frames:
        raise ValueError(f"batches hold whole movies of {k.n_frames} frames "
                         f"(got frames {first_index}..{first_index + len(arrays['images']) - 1})")
    simulate_batch(
        k, s.row, s.col, s.direction, s.start_s, s.dt_after_s, np.uint64(key),
        np.int64(first_index // k.n_frames), arrays["images"], arrays["expected"],
        arrays["trajectories"], arrays["centroids"], arrays["n_particles"],
        arrays["diffusion"], arrays["n_qd"], arrays["exposure_xy"], arrays["exposure_t_s"],
        arrays["in_view"], arrays["frame_start_s"], arrays["centroid_z_um"], arrays["exposure_z_um"],
        arrays["exposure_weight"], arrays["on_fraction"], substream_key(key, "blinking"),
        substream_key(key, "noise"), want_expected, want_traj,
    )
    out = dict(arrays)
    if not k.blinking:
        out.pop("on_fraction")
    if not want_expected:
        out.pop("expected")
    if not want_traj:
        out.pop("trajectories")
    return out


def store_rows(ds: Dataset, frames: dict) -> dict:
    """The store's rows from the kernel's frames (``stacks.as_rows``)."""
    planes = ds.planes if ds.stack is not None else None
    return as_rows(frames, planes, ds.plane_z_um, ds.image.height_px, ds.image.width_px)


def simulate(ds: Dataset, seed: int, start: int = 0, stop: int | None = None, rows: bool = True) -> dict:
    """Simulate store rows ``start .. stop`` of dataset ``ds`` in memory (``factory.simulate``).

    For tests and notebooks: images, movie frames or stacks, the same bytes that
    ``factory build`` writes to those rows of the store, whatever ``start`` and ``stop``.

    Parameters
    ----------
    ds : Dataset
        A validated dataset (``FactoryConfig.datasets[name]``); its name keys the
        random streams.
    seed : int
        The config's seed (``FactoryConfig.seed``).
    start, stop : int
        Store rows ``start .. stop - 1`` (default: all ``ds.n_images``); for movies,
        whole movies.
    rows : bool
        True: the store's rows.  False: the kernel's per-frame arrays instead (a stack's
        planes one by one, with their z truth ``centroid_z_um``, ``exposure_z_um`` and
        ``exposure_weight``).

    Returns
    -------
    dict of str to ndarray
        The arrays, named, shaped and typed as in a store (``factory.stores``): e.g.
        ``images`` (N, H, W) uint16 photon counts ((N, Z, H, W) for stacks),
        ``centroids`` (N, P, 2) float32 px, ``exposure_xy`` (N, P, 2) px,
        ``exposure_t_s`` (N, P) s from the movie's start, ``diffusion`` (N, P) um^2/s;
        ``expected`` and ``trajectories`` only where ``ds.output`` keeps them.

    Raises
    ------
    ValueError
        ``start`` or ``stop`` splits a movie.

    Examples
    --------
    >>> from factory import parse_config, simulate
    >>> cfg = parse_config({"seed": 1, "datasets": {"val": {"n_images": 8}}})
    >>> simulate(cfg.datasets["val"], cfg.seed, 0, 4)["images"].shape
    (4, 24, 25)
    """
    stop = ds.n_images if stop is None else stop
    k = kernel_params(ds)
    Z = ds.planes
    want_e, want_t = ds.output.expected, ds.output.trajectories
    arrays = allocate_batch(k, (stop - start) * Z, want_e, want_t)
    frames = run_batch(k, schedule_of(ds), dataset_key(seed, ds.name), start * Z, arrays, want_e, want_t)
    return store_rows(ds, frames) if rows else frames

