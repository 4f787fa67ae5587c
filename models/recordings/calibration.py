"""The detector and background of a user's microscope, estimated from its own recording.

Pixels of a two-photon microscope are detector units (ADU).  A photomultiplier turns n
detected photons, n ~ Poisson(m), into ADU = offset + (sum of n gains) + read noise, each
gain gamma-distributed with mean g and excess noise factor F (the simulator's ``pmt``
detector).  The cumulants of ADU - offset over pixels of one mean are then

    k1 = m g,    k2 = m g^2 F + r^2,    k3 = m g^3 F (2F - 1)

(the Gaussian read noise r adds to k2 only).  Photon transfer alone (variance against
mean, Janesick 2007) gives g F, not g; the third cumulant separates them:
k3 k1 / (k2 - r^2)^2 = (2F - 1) / F.

With dark frames (laser blanked) the offset and read noise are measured directly, and
background pixels of the recording give g F and k3 per tile; pooled over tiles,
slope2 = g F and slope3 = g^2 F (2F - 1), so F = 1 / (2 - slope3 / slope2^2).  Without
dark frames the offset is found only where the background varies over the field: the
variance and the third cumulant against the mean are straight lines through the
offset; where it does not vary enough, the estimate says so (``undetermined``) and
what it assumed instead.

Background pixels are those far from any bright structure in their frame (spots are
masked, widened by ``MASK_GROW_PX``), pooled per tile over all frames.  Uncertainties
are bootstrap standard deviations over frames (frames are independent noise draws),
computed from per-frame power sums so that a resample costs no pass over the pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from factory.config import ParticleSpec, PSFSpec
from factory.errors import FactoryError

# The seed paper's PSF width and brightness (the config schema's defaults): the scale
# spots are first looked for at, and what is assumed where a recording cannot tell.
PAPER_SIGMA_XY_UM = PSFSpec().sigma_xy_um
PAPER_N_QD = ParticleSpec().n_qd.value

TILE_PX = 32  # background tiles: small enough to follow unevenness, large enough for k3
MASK_GROW_PX = 4  # masked margin around bright structure (a spot's tail at sigma_xy ~ 3 px)
BOOTSTRAP = 200
# Without dark frames on an even background: the excess noise factor taken as known, that
# of a typical GaAsP or multialkali photomultiplier (1.1 - 1.5), and said so.
ASSUMED_ENF = 1.3


class Caution(str):
    """A note the user should act on, not only read.

    Something the recording did not determine (a default or an assumption was written
    instead) or that compromises it (saturation).  A plain ``str`` everywhere (the
    report, ``calibration.json``); `factory calibrate` also prints these on stderr.
    """


@dataclass(frozen=True)
class Estimate:
    """A value with its standard uncertainty (NaN where not determined).

    ``note``: where the recording does not determine it, why and what was assumed.
    """

    value: float
    sigma: float = math.nan
    note: str = ""

    def contains(self, truth: float, k: float = 2.0) -> bool:
        """Whether ``truth`` lies within ``k`` standard uncertainties."""
        return bool(abs(self.value - truth) <= k * self.sigma)


@dataclass(frozen=True)
class DetectorCalibration:
    """The detector and background estimated from a recording (ADU unless named)."""

    offset_adu: Estimate
    read_noise_adu: Estimate
    gain_x_enf_adu: Estimate  # g F: the photon-transfer slope
    gain_adu_per_photon: Estimate
    excess_noise_factor: Estimate
    background_adu: Estimate  # mean background level above the offset
    n_bkg: Estimate  # photons per pixel
    unevenness: float  # relative std of the background over tiles (shot noise removed)
    photon_counting: bool  # gain 1, no offset, no excess noise: counts already photons
    n_background_px: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The fields as a dict, each ``Estimate`` as ``{value, sigma, note}``."""
        return asdict(self)

    def detector_config(self) -> dict:
        """The ``detector`` section of a datasets config."""
        if self.photon_counting:
            return {"type": "poisson"}
        out = {"type": "pmt", "gain_adu_per_photon": _round(self.gain_adu_per_photon.value),
               "excess_noise_factor": _round(min(max(self.excess_noise_factor.value, 1.01), 10.0)),
               "offset_adu": _round(max(self.offset_adu.value, 0.0))}
        if self.read_noise_adu.value > 0:
            out["read_noise_adu"] = _round(self.read_noise_adu.value)
        return out


def _round(x: float) -> float:
    return float(f"{x:.4g}")


# --- background pixels and their moments -----------------------------------------------


def background_mask(frame: np.ndarray, grow_px: int = MASK_GROW_PX) -> np.ndarray:
    """True where ``frame`` is background, far from any bright structure.

    Background: not within ``grow_px`` of a pixel where the frame, smoothed at a spot's
    scale (Gaussian, 1.5 px), stands 5 robust standard deviations above its median.
    The threshold is high so that noise alone almost never
    crosses it: masking the bright side of the noise would shrink the variance and the
    third cumulant that the gain is read from.
    """
    smooth = ndimage.gaussian_filter(frame.astype(np.float64), 1.5, mode="nearest")
    med = np.median(smooth)
    mad = 1.4826 * np.median(np.abs(smooth - med))
    bright = smooth > med + 5.0 * max(mad, 1e-12)
    if grow_px > 0:
        bright = ndimage.maximum_filter(bright, size=2 * grow_px + 1)
    return ~bright


def tile_power_sums(frames: np.ndarray, tile_px: int = TILE_PX) -> tuple[np.ndarray, float]:
    """Per frame and tile, the sums of 1, x, x^2 and x^3 over background pixels.

    x is relative to the first frame's median (for numerical range), which is returned
    too: ``(sums (T, tiles, 4) float64, median)``.
    """
    t, h, w = frames.shape
    ny, nx = max(1, h // tile_px), max(1, w // tile_px)
    ref = float(np.median(frames[0]))
    tiles = (np.minimum(np.arange(h) * ny // h, ny - 1)[:, None] * nx
             + np.minimum(np.arange(w) * nx // w, nx - 1)[None, :]).ravel()
    out = np.zeros((t, ny * nx, 4))
    for i in range(t):
        x = frames[i].astype(np.float64).ravel() - ref
        keep = background_mask(frames[i]).ravel()
        lab, xk = tiles[keep], x[keep]
        for p in range(4):
            out[i, :, p] = np.bincount(lab, weights=xk**p if p else None, minlength=ny * nx)
    return out, ref


def _moments(sums: np.ndarray, ref: float):
    """Mean, variance and third central moment per tile from summed power sums (tiles, 4)."""
    n = sums[:, 0]
    ok = n > 10
    n = np.where(ok, n, 1.0)
    e1, e2, e3 = sums[:, 1] / n, sums[:, 2] / n, sums[:, 3] / n
    var = e2 - e1**2
    m3 = e3 - 3 * e1 * e2 + 2 * e1**3
    return (e1 + ref)[ok], var[ok], m3[ok], sums[ok, 0]


# --- the estimates -----------------------------------------------------------------------


def _estimate_from_sums(sums: np.ndarray, ref: float, dark: tuple[float, float, float] | None,
                        assume_enf: float | None = None):
    """The detector's moments from power sums summed over frames; None where they give nothing.

    Returns (offset, read variance, gF, g^2 F (2F - 1), background above offset,
    per-tile background above offset).  ``dark``: the dark frames' (mean, variance,
    third central moment), or None; ``assume_enf``: without dark frames, the excess
    noise factor taken as known (and no read noise).
    """
    mean, var, m3, n = _moments(sums, ref)
    if dark is None and assume_enf is not None:
        # k3 / k2 = g (2F - 1) gives g, then k2 = g F a the background a above the offset.
        wts = n / n.sum()
        v, c = float(np.sum(wts * var)), float(np.sum(wts * m3))
        if v <= 0 or c <= 0:
            return None
        slope2 = c / (v * (2 * assume_enf - 1)) * assume_enf
        slope3 = slope2**2 * (2 * assume_enf - 1) / assume_enf
        offset, read_var = float(np.sum(wts * mean)) - v / slope2, 0.0
        a = mean - offset
    elif dark is not None:
        offset, read_var, dark_m3 = dark
        a = mean - offset
        slope2 = float(np.sum(n * (var - read_var)) / np.sum(n * a))
        slope3 = float(np.sum(n * (m3 - dark_m3)) / np.sum(n * a))
    else:
        # Variance and k3 against the mean: straight lines through the offset.
        wts = n / n.sum()
        mu = float(np.sum(wts * mean))
        smu = float(np.sum(wts * (mean - mu) ** 2))
        if smu <= 0:
            return None
        slope2 = float(np.sum(wts * (mean - mu) * var) / smu)
        slope3 = float(np.sum(wts * (mean - mu) * m3) / smu)
        i3 = float(np.sum(wts * m3)) - slope3 * mu
        offset = -i3 / slope3 if slope3 > 0 else math.nan
        read_var = float(np.sum(wts * var)) - slope2 * (mu - offset)
        a = mean - offset
    bkg = float(np.sum(n * a) / np.sum(n))
    return offset, read_var, slope2, slope3, bkg, a


def calibrate_detector(frames: np.ndarray, dark: np.ndarray | None = None, *, tile_px: int = TILE_PX,
                       bootstrap: int = BOOTSTRAP, seed: int = 0, source: str = "the recording") -> DetectorCalibration:
    """Offset, read noise, gain, excess noise factor and background of the detector that recorded ``frames``.

    From the background pixels of ``frames`` (T x H x W, or H x W, ADU) and, if given,
    ``dark`` frames (T' x H x W, laser blanked); see the module docstring.
    Uncertainties are the standard deviations of ``bootstrap`` resamples of the frames
    (``seed``), background tiles ``tile_px`` px wide.  ``source`` names the frames in
    errors.  Raises FactoryError on frames of another shape, a constant image, or a
    background with no positive variance and skew.
    """
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or frames.size == 0:
        raise FactoryError(f"{source}: expected frames T x H x W, got shape {frames.shape}")
    if float(frames.max()) == float(frames.min()):
        raise FactoryError(f"{source}: every pixel has the value {float(frames.min()):g}; a constant image "
                           "holds no noise to calibrate from (is the detector on?)")
    rng = np.random.default_rng(seed)
    sums, ref = tile_power_sums(frames, tile_px)
    notes: list[str] = []
    sat = saturation(frames)
    if sat is not None:  # clipped pixels are spot cores (a clipped background is refused by `calibrate`)
        notes.append(Caution(f"saturated: {100 * sat[1]:.2g}% of the pixels sit at the ceiling {sat[0]:g} ADU"))

    dark_stats = None
    if dark is not None:
        dark = np.asarray(dark, np.float64)
        if dark.ndim == 2:
            dark = dark[None]
        dark_stats = _dark_stats(dark)
    elif _counts_photons(frames, sums, ref, rng, bootstrap):
        # Photon counting needs no dark frames: its zero offset and read noise are
        # what the background's own cumulants say (variance and skew equal to the mean).
        dark_stats = (0.0, 0.0, 0.0)
        notes.append("no dark frames: the background's variance and third cumulant equal its mean, as photon "
                     "counts' do, so offset 0 and no read noise are taken")

    def estimate(assume_enf=None):
        """The estimate and the bootstrap over frames (and dark frames) of its first five values."""
        est = _estimate_from_sums(sums.sum(0), ref, dark_stats, assume_enf)
        boots = []
        for _ in range(bootstrap):
            pick = rng.integers(0, len(frames), len(frames))
            d = dark_stats if dark is None else _dark_stats(dark[rng.integers(0, len(dark), len(dark))])
            b = _estimate_from_sums(sums[pick].sum(0), ref, d, assume_enf)
            if b is not None:
                boots.append(b[:5])
        boots = np.array(boots) if boots else np.full((1, 5), np.nan)
        return est, boots, (np.nanstd(boots, axis=0) if len(boots) > 1 else np.full(5, np.nan))

    est, boots, sd = estimate()
    assumed = None
    if dark_stats is None and (est is None or not math.isfinite(est[0]) or sd[0] > 0.1 * max(abs(est[4]), 1.0)):
        # An even background cannot place the offset: take F as known instead (said below).
        assumed = ASSUMED_ENF
        est, boots, sd = estimate(assumed)
    if est is None:
        raise FactoryError(f"{source}: the background's noise has no positive variance and skew; nothing to "
                           "calibrate from (is the detector on?)")

    offset, read_var, slope2, slope3, bkg, per_tile = est
    ratio = slope3 / slope2**2 if slope2 > 0 else math.nan  # (2F - 1) / F
    enf = 1.0 / (2.0 - ratio) if ratio < 2 else math.inf
    b_ratio = boots[:, 3] / boots[:, 2] ** 2
    b_enf = np.where(b_ratio < 2, 1.0 / (2.0 - b_ratio), np.nan)
    b_gain = boots[:, 2] / b_enf
    gain = slope2 / enf
    b_nbkg = boots[:, 4] / b_gain

    offset_note = ("" if dark is not None else "photon counting (no dark frames)" if dark_stats is not None
                   else "from the background's spread over the field (no dark frames)")
    if assumed is not None:
        offset_note = (f"assumed: no dark frames and an even background; taken from the background's cumulants "
                       f"with the excess noise factor assumed {assumed:g} and no read noise (record 20 frames "
                       "with the laser blanked, --dark, to measure it)")
        notes.append(Caution(f"offset, gain and excess noise factor: {offset_note}"))
        notes.append(Caution("read noise: not determined without dark frames; assumed 0"))
    read_noise = math.sqrt(max(read_var, 0.0))
    read_sd = float(np.nanstd(np.sqrt(np.maximum(boots[:, 1], 0.0))))
    enf_est = Estimate(enf, float(np.nanstd(b_enf)))
    gain_est = Estimate(gain, float(np.nanstd(b_gain)))
    if assumed is not None:
        enf_est = Estimate(assumed, math.nan, "assumed (no dark frames, even background)")
        gain_est = Estimate(gain, gain_est.sigma, "follows the assumed excess noise factor")
    elif not math.isfinite(enf) or enf_est.sigma > 0.5 * max(enf - 1.0, 0.05):
        note = ("not determined: the third cumulant of the background is too noisy to separate gain from "
                "excess noise (too few background pixels or photons)")
        enf_est, gain_est = Estimate(enf, enf_est.sigma, note), Estimate(gain, gain_est.sigma, note)
        notes.append(Caution(f"gain and excess noise factor: {note}; only their product g F is determined"))
    n_bkg = bkg / gain if gain > 0 else math.nan
    # Unevenness: the spread of per-tile backgrounds beyond what their own noise explains.
    _, var_t, _, n_t = _moments(sums.sum(0), ref)
    rel = per_tile / bkg if bkg > 0 else per_tile
    noise_rel = np.sqrt(var_t / n_t) / max(bkg, 1e-12)
    unevenness = float(np.sqrt(max(np.var(rel) - np.mean(noise_rel**2), 0.0)))
    photon_counting = bool(
        dark_stats is not None and abs(offset) < 0.05 and read_noise < 0.35  # rounding alone: 0.29
        and abs(slope2 - 1) < max(3 * sd[2], 0.05) and abs(enf - 1) < max(3 * enf_est.sigma, 0.05))
    if photon_counting:
        notes.append("photon counting recognised: offset 0, gain 1, no excess noise (the `poisson` detector)")
    return DetectorCalibration(
        offset_adu=Estimate(offset, sd[0], offset_note),
        read_noise_adu=Estimate(read_noise, read_sd),
        gain_x_enf_adu=Estimate(slope2, sd[2]),
        gain_adu_per_photon=gain_est,
        excess_noise_factor=enf_est,
        background_adu=Estimate(bkg, sd[4]),
        n_bkg=Estimate(n_bkg, float(np.nanstd(b_nbkg))),
        unevenness=unevenness,
        photon_counting=photon_counting,
        n_background_px=int(sums[..., 0].sum()),
        notes=notes,
    )


def _counts_photons(frames: np.ndarray, sums: np.ndarray, ref: float, rng, bootstrap: int) -> bool:
    """Whether non-negative integer frames fit photon counting (offset 0, gain 1, no excess or read noise).

    They do when the background's variance and third central moment both equal its
    mean, within three bootstrap deviations (over frames) or 3 % and 10 %.
    """
    if frames.min() < 0 or not np.array_equal(frames, np.round(frames)):
        return False

    def ratios(s):
        mean, var, m3, n = _moments(s, ref)
        if not len(n):
            return math.nan, math.nan
        w = n / n.sum()
        mu = float(np.sum(w * mean))
        return (float(np.sum(w * var)) / mu, float(np.sum(w * m3)) / mu) if mu > 0 else (math.nan, math.nan)

    r2, r3 = ratios(sums.sum(0))
    boots = np.array([ratios(sums[rng.integers(0, len(sums), len(sums))].sum(0)) for _ in range(max(bootstrap, 10))])
    sd2, sd3 = np.nanstd(boots, axis=0)
    return bool(abs(r2 - 1) < max(3 * sd2, 0.03) and abs(r3 - 1) < max(3 * sd3, 0.10))


def _dark_stats(dark: np.ndarray) -> tuple[float, float, float]:
    """Mean, variance and third central moment of dark frames (float64)."""
    mu = float(dark.mean())
    c = dark - mu
    return mu, float((c**2).mean()), float((c**3).mean())


# --- spots: PSF width and brightness ----------------------------------------------------


@dataclass(frozen=True)
class SpotCalibration:
    """PSF width and brightness from isolated spots."""

    sigma_xy_um: Estimate
    n_qd: Estimate  # median over spots, in-focus equivalent (Eq. 1 with the given sigma_z)
    n_qd_quantiles: tuple[float, float, float]  # 10th, 50th, 90th percentile over spots
    n_spots: int
    spots_per_frame: float  # every spot found, isolated or not
    notes: list[str] = field(default_factory=list)
    n_qd_spread: float = 0.0  # the dots' brightness: uniform over n_qd (1 +- spread)
    particles_in_view: float = math.nan  # dots in the field per frame, found or not
    frames_looked: int = 0  # the first frames the spots came from (the reading stops at max_spots)


def spot_noise(frame: np.ndarray, sigma_px: float) -> float:
    """The robust standard deviation of ``frame`` smoothed at ``sigma_px``: the scale of spot thresholds.

    1.4826 MAD of the smoothed frame about the frame's median.
    """
    return float(1.4826 * np.median(np.abs(ndimage.gaussian_filter(frame, sigma_px) - np.median(frame))))


def find_spots(photons: np.ndarray, sigma_px: float, threshold: float):
    """Local maxima (row, col, height) of a frame of background-free photons smoothed at ``sigma_px``.

    Only those above ``threshold`` (in smoothed photons).
    """
    smooth = ndimage.gaussian_filter(photons, sigma_px, mode="nearest")
    peak = (smooth == ndimage.maximum_filter(smooth, size=2 * int(math.ceil(2 * sigma_px)) + 1)) & (smooth > threshold)
    r, c = np.nonzero(peak)
    return r, c, smooth[r, c]


def _fit_rows(win: np.ndarray, s0: float):
    """Fit one spot's window: rows of Gaussians of one width, their centres on a straight line.

    The window is rows x cols of background-free photons; each row is a Gaussian in x
    of its own height.  Within
    a row the laser passes the spot in microseconds, so a row is an unsmeared slice of
    the PSF; between rows the particle moves (the scan smear), which the line's slope
    follows on average.  (A free centre per row would chase the noise of a dim spot a
    few pixels wide and make it look narrow.)  Returns (width px, row heights, converged).
    """
    from scipy.optimize import least_squares

    nr, nc = win.shape
    x = np.arange(nc) - (nc - 1) / 2
    r = np.arange(nr) - (nr - 1) / 2
    h0 = np.maximum(win.max(1), 1e-3)

    def resid(p):
        s, mu = p[0], p[1] + p[2] * r
        model = p[3:, None] * np.exp(-(x[None, :] - mu[:, None]) ** 2 / (2 * s * s))
        return (model - win).ravel()

    lo = np.r_[0.3, -nc / 2, -nc, np.zeros(nr)]
    hi = np.r_[nc, nc / 2, nc, np.full(nr, np.inf)]
    res = least_squares(resid, np.r_[s0, 0.0, 0.0, h0], bounds=(lo, hi), x_scale="jac")
    return res.x[0], res.x[3:], res.success


def calibrate_spots(photons: np.ndarray, pixel_size_um: float, sigma_z_um: float = 1.36,
                    sigma_guess_um: float = PAPER_SIGMA_XY_UM, max_spots: int = 400) -> SpotCalibration:
    """sigma_xy (um) and N_qd from isolated spots in frames of background-free photons.

    ``photons`` is T x H x W: (ADU - offset) / gain - background; ``pixel_size_um`` and
    the guess ``sigma_guess_um`` (um) set the spot scale, ``sigma_z_um`` (um) the Eq. 1
    conversion; the reading stops once ``max_spots`` spots are fitted.  Raises
    FactoryError with fewer than 5 isolated spots.

    A spot is a local maximum of the frame smoothed at the PSF's scale, at least 5 robust
    noise deviations high, with no other maximum within 6 sigma and 3 sigma from the
    edges.  Its central rows (1.2 sigma each side, at least 2) are fitted together
    (``_fit_rows``): the shared width is sigma_xy, and the brightest row's height is the
    peak, so N_qd = peak x 2 pi sigma_xy^2 x sqrt(2 pi) sigma_z (Eq. 1 at focus: an
    out-of-focus dot counts as a dimmer one).
    """
    notes: list[str] = []
    s_px = sigma_guess_um / pixel_size_um
    noise = spot_noise(photons[0], s_px)
    thr = 5.0 * max(noise, 1e-6)
    half_c = int(math.ceil(3 * s_px))
    half_r = max(2, int(math.ceil(1.2 * s_px)))
    iso = 6 * s_px
    widths, peaks, where, found, looked = [], [], [], 0, 0
    for i, frame in enumerate(photons):
        r, c, hgt = find_spots(frame, s_px, thr)
        found += len(r)
        looked += 1
        if len(r) == 0:
            continue
        d2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
        np.fill_diagonal(d2, 10**9)
        ok = (d2.min(1) > iso**2) & (r >= max(half_c, half_r)) & (r < frame.shape[0] - max(half_c, half_r)) \
            & (c >= half_c) & (c < frame.shape[1] - half_c)
        for y, x in zip(r[ok], c[ok]):
            rows = np.arange(y - half_r, y + half_r + 1)
            win = frame[rows][:, x - half_c:x + half_c + 1]
            s, h, conv = _fit_rows(win, s_px)
            if not conv or s <= 0.3 or s >= half_c:
                continue
            # The brightest row's height: the peak, less a row's sampling offset and the
            # smear, both of which the simulated side shares (``fit_spot_model``).
            widths.append(s)
            peaks.append(float(h.max()))
            where.append((i, x, y))
        if len(widths) >= max_spots:
            break
    n = len(widths)
    if n < 5:
        raise FactoryError(f"found {n} isolated spot(s) (need at least 5) to measure the PSF width and brightness")
    w = np.array(widths) * pixel_size_um
    sxy = float(np.median(w))
    nqd = np.array(peaks) * 2 * math.pi * sxy**2 * math.sqrt(2 * math.pi) * sigma_z_um
    q = tuple(float(v) for v in np.percentile(nqd, [10, 50, 90]))
    # The spots of one dot in successive frames are one draw of its brightness, not many:
    # the medians' standard errors come from resampling dots (spots linked within the
    # isolation distance), not spots.
    dot = dots(np.array(where), 2 * iso)
    sxy_sd, nqd_sd = (float(np.std(v, ddof=1)) for v in
                      cluster_bootstrap_medians(np.stack([w, nqd]), dot, seed=n).T)
    notes.append(f"N_qd: in-focus equivalent with sigma_z {sigma_z_um:g} um (a 2D recording does not "
                 "measure sigma_z; a dot out of focus counts as a dimmer one)")
    # Spots per frame over the frames looked at (the loop stops once it has max_spots).
    return SpotCalibration(Estimate(sxy, sxy_sd), Estimate(q[1], nqd_sd), q, n, found / looked, notes,
                           frames_looked=looked)


def dots(where: np.ndarray, radius_px: float) -> np.ndarray:
    """The dot (0, 1, ...) of each spot ``(frame, x, y)``, rows of ``where``.

    Spots are linked from frame to frame within ``radius_px`` (TrackPy, ``memory=5``).
    """
    import pandas as pd

    from models.tracking.tracks import link

    table = pd.DataFrame({"frame": where[:, 0], "x": where[:, 1].astype(float), "y": where[:, 2].astype(float),
                          "spot": np.arange(len(where))})
    linked = link(table, radius_px, memory=5)
    out = np.empty(len(where), np.int64)
    out[linked["spot"].to_numpy()] = linked["track"].to_numpy()
    return out


def cluster_bootstrap_medians(values: np.ndarray, cluster: np.ndarray, n_boot: int = 200,
                              seed: int = 0) -> np.ndarray:
    """Bootstrap medians (n_boot x K) of the K rows of ``values`` (K x N), resampling whole clusters.

    Clusters are drawn with replacement (N spots, ``cluster`` the id of each).
    """
    rng = np.random.default_rng(seed)
    ids, inv = np.unique(cluster, return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(ids))]
    out = np.empty((n_boot, values.shape[0]))
    for b in range(n_boot):
        take = np.concatenate([members[k] for k in rng.integers(0, len(ids), len(ids))])
        out[b] = np.median(values[:, take], axis=1)
    return out


def simulated_photons(microscope: dict, n_frames: int, seed: int, detector: DetectorCalibration | None = None,
                      movie: dict | None = None, n_movies: int = 1):
    """Frames of the simulator for a datasets-config section ``microscope``, as background-free photons.

    ``microscope`` holds image, scan, psf, background, particles and detector sections;
    the frames are turned into background-free photons the way a recording is (with
    ``detector``: its estimated offset, gain and background; else only N_bkg is
    subtracted).  With
    ``movie`` (a `movie` section, such as ``{"frame_flyback_ms": 2}``), one movie of
    ``n_frames`` (``n_movies`` of them, one after the other), whose dots live
    ``MOVIE_MARGIN_UM`` beyond the field and diffuse in x, y and z from frame to frame as
    a recording's do; else independent images.
    """
    from factory.config import parse_config
    from factory.kernel import simulate

    frames = {"n_images": n_frames} if movie is None else \
        {"n_movies": n_movies, "movie": {**movie, "n_frames": n_frames, "margin_um": MOVIE_MARGIN_UM}}
    ds_cfg = {**microscope, **frames, "output": {"expected": False, "trajectories": False}}
    cfg = parse_config({"seed": seed, "datasets": {"sim": ds_cfg}}, source="the calibrated microscope")
    adu = simulate(cfg.datasets["sim"], cfg.seed)["images"].astype(np.float64)
    if detector is None:
        return adu - microscope.get("background", {}).get("n_bkg", 0.0)
    return to_photons(adu, detector)


MOVIE_MARGIN_UM = 1.0  # the calibrated movies' dots live this far beyond the field (as `movie.margin_um`)
MOVIE_DOTS, MAX_MOVIES = 100, 4  # the spot model's simulated movies: dots pooled, and at most this many movies


def to_photons(adu: np.ndarray, detector: DetectorCalibration) -> np.ndarray:
    """ADU to background-free photons with the estimated detector."""
    return (np.asarray(adu, np.float64) - detector.offset_adu.value) / detector.gain_adu_per_photon.value \
        - detector.n_bkg.value


def fit_spot_model(photons: np.ndarray, microscope: dict, detector: DetectorCalibration, pixel_size_um: float,
                   sigma_z_um: float = 1.36, sim_frames: int = 24, seed: int = 0,
                   diffusion_um2_s: dict | float | None = None, frame_flyback_ms: float | None = None
                   ) -> SpotCalibration:
    """sigma_xy and N_qd by the simulator's own spot model (indirect inference).

    The row-wise fit (``calibrate_spots``) is exact on noise-free spots but reads dim,
    noisy ones as narrow; rather than model that bias, the simulator is run with the
    calibrated detector and background, the recording's scan, and candidate sigma_xy
    (a grid around the first reading, with the same random draws at every point), its
    frames measured exactly as the recording's; sigma_xy is where the measured width,
    a straight line in the candidate, meets the recording's.  N_qd is then scaled by
    observed / simulated brightness (twice).  Noise, scan smear, spot selection and
    out-of-focus dots are so the same on both sides.

    A recording is a movie: its dots wander in z from frame to frame, so later frames
    hold more dim, out-of-focus dots than independent images do (N_qd came out 5-10%
    low on held-out movies).  With ``diffusion_um2_s`` (the D law of a first tracking
    pass), the fit ends with two rounds on a simulated movie as long as the stretch of
    the recording read (and its ``frame_flyback_ms``), with the dots in view found above
    and that D: its reading corrects N_qd once more.
    """
    # The measurement (its smoothing, window and isolation distance follow the guessed
    # width) is set once, from a first look, and then applied alike to both sides.
    guess = calibrate_spots(photons, pixel_size_um, sigma_z_um).sigma_xy_um.value
    seen = calibrate_spots(photons, pixel_size_um, sigma_z_um, sigma_guess_um=guess)
    notes = list(seen.notes)

    # Enough simulated dots that every candidate shows some: at least 10 per frame.
    particles = dict(microscope.get("particles", {}))
    particles["count"] = max(int(particles.get("count", 1)), 10)
    microscope = {**microscope, "particles": particles}

    def measure(sxy, nqd, spread=0.0, movie=None, n_movies=1):
        """The simulated side's reading, or None where too few isolated spots show."""
        if movie is None:
            sim = simulated_photons(_with_spots(microscope, sxy, nqd, spread), sim_frames, seed, detector)
        else:
            flyback = {} if frame_flyback_ms is None else {"frame_flyback_ms": frame_flyback_ms}
            sim = simulated_photons(_with_spots(movie, sxy, nqd, spread), seen.frames_looked, seed, detector, flyback,
                                    n_movies)
        try:  # every frame of the simulated movies: each covers the stretch of the recording read
            return calibrate_spots(sim, pixel_size_um, sigma_z_um, sigma_guess_um=guess,
                                   **({} if movie is None else {"max_spots": 10**9}))
        except FactoryError:
            return None

    s_obs, n_obs = seen.sigma_xy_um.value, seen.n_qd.value
    q_obs = seen.n_qd_quantiles
    spread_obs = (q_obs[2] - q_obs[0]) / q_obs[1]
    sxy, nqd, s_slope, spread = s_obs, n_obs, 1.0, 0.0
    for _ in range(2):  # width, brightness and its spread bias each other's reading: twice round
        grid = sxy * np.array([0.8, 0.9, 1.0, 1.1, 1.2])
        got = [(s, m.sigma_xy_um.value) for s in grid if (m := measure(s, nqd, spread)) is not None]
        slope = np.polyfit(*zip(*got), 1)[0] if len(got) >= 3 else 0.0
        if slope <= 0.1:
            notes.append("sigma_xy: the simulated width hardly follows the PSF width at this signal; the "
                         "direct reading (biased low on dim spots) is kept")
            break
        icept = np.polyfit(*zip(*got), 1)[1]
        sxy, s_slope = float(np.clip((s_obs - icept) / slope, 0.5 * grid[0], 1.5 * grid[-1])), slope
        # The dots' own brightness spread (uniform +-spread): the one whose simulated
        # 10th - 90th percentile range, relative to the median, is the recording's.
        # Brighter dots are found more often, so the spread moves the median found.
        spreads, seen_spread = [], []
        for w in (0.0, 0.15, 0.3, 0.45, 0.6):
            if (m := measure(sxy, nqd, w)) is not None:
                q = m.n_qd_quantiles
                spreads.append(w)
                seen_spread.append((q[2] - q[0]) / q[1])
        if spreads:
            spread = float(np.interp(spread_obs, np.maximum.accumulate(seen_spread), spreads))
        if (m := measure(sxy, nqd, spread)) is not None:
            nqd = float(max(nqd * n_obs / m.n_qd.value, 1e-3))
    # Dots in view: the simulated count scaled by the spots found per frame, real over
    # simulated (dim and out-of-focus dots are missed alike on both sides).
    in_view = math.nan
    final = measure(sxy, nqd, spread)
    if final is not None and final.spots_per_frame > 0:
        in_view = particles["count"] * seen.spots_per_frame / final.spots_per_frame
    if diffusion_um2_s is not None and math.isfinite(in_view) and s_slope > 0.1 and seen.frames_looked > 1:
        img = microscope["image"]
        h_um, w_um = img["height_px"] * pixel_size_um, img["width_px"] * pixel_size_um
        region = (h_um + 2 * MOVIE_MARGIN_UM) * (w_um + 2 * MOVIE_MARGIN_UM) / (h_um * w_um)
        movie = {**microscope, "particles": {**particles, "count": max(1, round(in_view * region)),
                                             "diffusion_um2_s": diffusion_um2_s}}
        # A movie's dots are few (tens): its own brightness draw would move the median by
        # several percent, so movies are pooled until they hold MOVIE_DOTS dots.
        n_movies = int(min(MAX_MOVIES, math.ceil(MOVIE_DOTS / movie["particles"]["count"])))
        for _ in range(2):
            if (m := measure(sxy, nqd, spread, movie, n_movies)) is None:
                break
            # Brightness only, by the spots' peak heights (N_qd / width^2): the width read
            # from a few hundred movie spots is too noisy to move sigma_xy, or N_qd through
            # it, and drift in z dims dots rather than widens them.
            final = m
            peak_ratio = (n_obs / s_obs**2) / (m.n_qd.value / m.sigma_xy_um.value**2)
            nqd = float(max(nqd * peak_ratio, 1e-3))
    # Each estimate is where the simulated reading meets the recording's, and the
    # simulated reading is a sample of spots too (one seed): its standard error adds to
    # the recording's.
    s_sim = final.sigma_xy_um.sigma if final is not None else 0.0
    n_sim = final.n_qd.sigma / final.n_qd.value if final is not None and final.n_qd.value > 0 else 0.0
    s_sd = math.hypot(seen.sigma_xy_um.sigma, s_sim) / s_slope
    n_sd = nqd * math.hypot(seen.n_qd.sigma / n_obs, n_sim)
    q = tuple(v * nqd / n_obs for v in seen.n_qd_quantiles)
    return SpotCalibration(Estimate(sxy, s_sd), Estimate(nqd, n_sd), q, seen.n_spots, seen.spots_per_frame, notes,
                           n_qd_spread=spread, particles_in_view=in_view)


def _with_spots(microscope: dict, sigma_xy_um: float, n_qd: float, spread: float = 0.0) -> dict:
    m = {k: dict(v) if isinstance(v, dict) else v for k, v in microscope.items()}
    m.setdefault("psf", {})["sigma_xy_um"] = sigma_xy_um
    m.setdefault("particles", {})["n_qd"] = _n_qd_law(n_qd, spread)
    return m


def _n_qd_law(n_qd: float, spread: float):
    """N_qd uniform over n_qd (1 +- spread), or fixed."""
    if spread <= 0.01:
        return _round(n_qd)
    return {"type": "uniform", "low": _round(n_qd * (1 - spread)), "high": _round(n_qd * (1 + spread))}


# --- a first tracking pass: the range of D ------------------------------------------------

MIN_TRACK_FRAMES = 10  # frames a first-pass track needs for its D to count


def first_pass_diffusion(photons: np.ndarray, pixel_size_um: float, sigma_xy_um: float, timing) -> dict:
    """The D (um^2/s) of the particles of a recording, from a first tracking pass.

    ``photons``: background-free photons, T x H x W; ``timing``: its ``ScanTiming``.
    Spots (as ``calibrate_spots`` finds them) are refined to their centroid, linked
    (TrackPy, for D up to 1 um^2/s over one frame), and the CVE taken of every track of
    at least ``MIN_TRACK_FRAMES`` frames on each spot's own scan time.  Returns
    ``{"D_um2_s": [...], "n_tracks": n, "frames": T}``; no tracks where the recording
    is too short.
    """
    import pandas as pd

    from models.tracking.timing import time_stamps
    from models.tracking.tracks import blur_r, diffusion_table, link, search_range_px

    t, h, w = photons.shape
    if t < MIN_TRACK_FRAMES:
        return {"D_um2_s": [], "n_tracks": 0, "frames": t}
    s_px = sigma_xy_um / pixel_size_um
    noise = spot_noise(photons[0], s_px)
    half = max(2, int(math.ceil(1.5 * s_px)))
    rows = []
    for i, frame in enumerate(photons):
        r, c, _ = find_spots(frame, s_px, 5.0 * max(noise, 1e-6))
        for y, x in zip(r, c):
            if not (half <= y < h - half and half <= x < w - half):
                continue
            win = np.clip(frame[y - half:y + half + 1, x - half:x + half + 1], 0, None)
            tot = win.sum()
            if tot <= 0:
                continue
            off = np.arange(-half, half + 1)
            rows.append((i, x + float((win.sum(0) * off).sum() / tot), y + float((win.sum(1) * off).sum() / tot)))
    table = pd.DataFrame(rows, columns=["frame", "x", "y"])
    if len(table) == 0:
        return {"D_um2_s": [], "n_tracks": 0, "frames": t}
    table.insert(1, "t_s", time_stamps(table, h, w, timing, "scan"))
    period = timing.frame_period_s(h, w)
    tracks = link(table, search_range_px(1.0, period, pixel_size_um, 1.0), memory=1)
    r_blur = blur_r("scan", period, timing.line_period_s(w), timing.active_s(h, w), sigma_xy_um, pixel_size_um)
    d = diffusion_table(tracks, pixel_size_um, r_blur, min_points=MIN_TRACK_FRAMES, estimator="cve")
    return {"D_um2_s": [float(v) for v in d["D_um2_s"]], "n_tracks": int(len(d)), "frames": t}


def first_pass_law(first_pass: dict) -> dict | float:
    """The D law the first pass saw, as a ``particles.diffusion_um2_s`` section.

    Log-uniform over the 10th - 90th percentile of its positive D, or the field's
    0.02 - 0.5 um^2/s with fewer than 5 tracks.
    """
    d = np.array([v for v in first_pass["D_um2_s"] if v > 0])
    if len(d) < 5:
        return {"type": "log_uniform", "low": 0.02, "high": 0.5}
    lo, hi = np.percentile(d, [10, 90])
    return {"type": "log_uniform", "low": float(lo), "high": float(max(hi, 1.01 * lo))}


def d_range(first_pass: dict) -> tuple[dict, str]:
    """The ``particles.diffusion_um2_s`` to train for, and a note on where it came from.

    Log-uniform from half the 10th to twice the 90th percentile of the first pass's
    positive D (the CVE scatters each track's D by tens of percent), else the field
    default (0.02 - 0.5 um^2/s), said so.
    """
    d = np.array([v for v in first_pass["D_um2_s"] if v > 0])
    if len(d) < 5:
        why = (f"{first_pass['frames']} frame(s), too short for a track" if first_pass["frames"] < MIN_TRACK_FRAMES
               else f"{len(d)} first-pass track(s) with a positive D")
        return ({"type": "log_uniform", "low": 0.02, "high": 0.5},
                Caution(f"D range: not estimated ({why}; at least 5 tracks of {MIN_TRACK_FRAMES} frames needed); the "
                        "field default, log-uniform 0.02 - 0.5 um^2/s, is written; edit particles.diffusion_um2_s if "
                        "yours differ"))
    lo, hi = np.percentile(d, [10, 90])
    low, high = _round(max(0.5 * lo, 1e-3)), _round(min(max(2 * hi, 2 * max(0.5 * lo, 1e-3)), 20.0))
    return ({"type": "log_uniform", "low": low, "high": high},
            f"D range: from a first tracking pass ({len(d)} tracks of >= {MIN_TRACK_FRAMES} frames, D 10th - 90th "
            f"percentile {lo:.3g} - {hi:.3g} um^2/s), widened to {low:g} - {high:g} um^2/s")


# --- the whole calibration: a recording in, a datasets config out -----------------------

MAX_FRAMES = 200  # frames read for the estimates (the noise statistics settle well before)
CALIBRATION_FILES = ("microscope.yaml", "train.yaml", "calibration.md", "calibration.png")


def calibrate(recording: str | Path, out: str | Path, *, pixel_size_um: float, dwell_us: float,
              line_retrace_ms: float, frame_flyback_ms: float | None = None, bidirectional: bool = False,
              dark: str | Path | None = None, sigma_z_um: float = 1.36, seed: int = 0,
              channel: int | None = None) -> dict:
    """Estimate a microscope from its recording and write a datasets config of it (``factory calibrate``).

    Writes into the folder ``out`` (which must exist) ``CALIBRATION_FILES``:
    ``microscope.yaml`` (a datasets config whose defaults carry the estimates, with
    train / val / test / movie sets sized for a CPU), ``train.yaml`` (a
    `factory train` config for it), ``calibration.md`` (the table of estimates, with what
    was assumed) and ``calibration.png`` (real beside simulated frames, pixel histograms).
    The first ``MAX_FRAMES`` frames are read.

    Parameters
    ----------
    recording : str or Path
        The recording (T x H x W TIFF, ``.npy`` or store), in detector units (ADU).
    out : str or Path
        An existing folder to write into.
    pixel_size_um : float
        Pixel size (um).
    dwell_us, line_retrace_ms : float
        Pixel dwell time (us) and line retrace (ms).
    frame_flyback_ms : float, optional
        Time from a frame's last pixel to the next frame's first (ms; default one line
        retrace).
    bidirectional : bool
        Scan direction.
    dark : str or Path, optional
        Dark frames (laser blanked) of the same field size: measure the offset and the
        read noise (without them these are inferred, or assumed, and said so).
    sigma_z_um : float
        Axial PSF sigma (um): a 2D recording does not measure it (default: the paper's).
    seed : int
        Seed of the bootstraps, the simulations and the config written.
    channel : int, optional
        The channel (from 0) of a recording that holds several (``open_recording``);
        dark frames of several channels are read in the same one.

    Returns
    -------
    dict
        ``recording``, ``frames_used``, ``dark``; ``detector`` (``DetectorCalibration``
        as a dict) and ``spots`` (``SpotCalibration`` as a dict, None where the spots
        could not be measured), each estimate with its standard uncertainty;
        ``first_pass`` (the first tracking pass's D, um^2/s); ``config`` (the datasets
        defaults written); ``notes`` (what the recording did not determine).

    Raises
    ------
    FactoryError
        A bad recording or dark frames (another field size), a saturated or constant
        recording, or a detector that cannot be calibrated without dark frames.
    """
    from models.recordings.recording import open_recording, tiff_channels

    recording, out = Path(recording), Path(out)
    with open_recording(recording, channel=channel) as rec:
        n_used = min(len(rec), MAX_FRAMES)
        frames = rec.frames(0, n_used)
        shape = rec.shape
    dark_frames = None
    if dark is not None:
        with open_recording(dark, channel=channel if tiff_channels(dark) > 1 else None) as d:
            if d.shape[1:] != shape[1:]:
                raise FactoryError(f"{dark}: dark frames of {d.shape[1]} x {d.shape[2]} px, the recording's are "
                                   f"{shape[1]} x {shape[2]} px; record both with one field")
            dark_frames = d.frames(0, min(len(d), MAX_FRAMES))
    sat = saturation(frames) if float(frames.max()) > float(frames.min()) else None  # constant: refused below
    if sat is not None and float(np.median(frames)) >= sat[0]:
        raise FactoryError(f"{recording}: half or more of the pixels sit at the ceiling {sat[0]:g} ADU; nothing can "
                           "be calibrated from a saturated recording (lower the PMT gain or the laser power)")
    det = calibrate_detector(frames, dark_frames, source=str(recording), seed=seed)
    notes = list(det.notes)
    if not (det.gain_adu_per_photon.value > 0 and math.isfinite(det.n_bkg.value)):
        raise FactoryError(f"{recording}: the detector could not be calibrated (gain {det.gain_adu_per_photon.value:.3g}); "
                           "give dark frames (--dark)")
    image = {"height_px": int(shape[1]), "width_px": int(shape[2]), "pixel_size_um": float(pixel_size_um)}
    scan = {"dwell_us": float(dwell_us), "line_retrace_ms": float(line_retrace_ms),
            "direction": "bidirectional" if bidirectional else "unidirectional"}
    photons = to_photons(frames, det)
    count = max(1, round(spots_guess(photons, pixel_size_um)))
    from models.tracking.timing import ScanTiming

    timing = ScanTiming(float(dwell_us), float(line_retrace_ms), frame_flyback_ms, bidirectional,
                        "the command line")
    try:
        if sat is not None:  # clipped spot cores: their width and brightness would come out wrong
            raise FactoryError(f"{100 * sat[1]:.2g}% of the pixels sit at the detector's ceiling {sat[0]:g} ADU, so the "
                               "brightest spots are clipped; record with a lower gain to calibrate them")
        # The dots' D, for the spot model's movie: a first pass at the directly read width.
        guess_um = calibrate_spots(photons, pixel_size_um, sigma_z_um).sigma_xy_um.value
        first = first_pass_diffusion(photons, pixel_size_um, guess_um, timing)
        spots = fit_spot_model(photons, {"image": image, "scan": scan, "detector": det.detector_config(),
                                         "background": {"n_bkg": det.n_bkg.value},
                                         "particles": {"count": count,
                                                       "diffusion_um2_s": 0.1,
                                                       "z_start_um": {"type": "uniform", "low": -1.0, "high": 1.0}}},
                               det, pixel_size_um, sigma_z_um, seed=seed, diffusion_um2_s=first_pass_law(first),
                               frame_flyback_ms=frame_flyback_ms)
        sigma_xy, n_qd, spread = spots.sigma_xy_um.value, spots.n_qd.value, spots.n_qd_spread
        notes += spots.notes
        if math.isfinite(spots.particles_in_view):
            count = max(1, round(spots.particles_in_view))
            notes.append(f"particle count: {count} dots in view per frame ({spots.spots_per_frame:.1f} found, the "
                         "rest too dim or out of focus, as the simulation of the calibrated microscope shows)")
        else:
            notes.append(f"particle count: {count} spots per frame found (dimmer, out-of-focus dots are missed)")
    except FactoryError as exc:
        spots, sigma_xy, n_qd, spread = None, PAPER_SIGMA_XY_UM, PAPER_N_QD, 0.3
        notes.append(Caution(f"PSF width and brightness: not estimated ({exc}); the paper's sigma_xy "
                             f"{PAPER_SIGMA_XY_UM:g} um and N_qd {PAPER_N_QD:g} (+-30%) are written"))
        notes.append(f"particle count: {count} spots per frame found (dimmer, out-of-focus dots are missed)")
    first = first_pass_diffusion(photons, pixel_size_um, sigma_xy, timing)
    diffusion, note = d_range(first)
    notes.append(note)
    margin_px = 1.0 / pixel_size_um
    region_count = max(1, round(count * (shape[1] + 2 * margin_px) * (shape[2] + 2 * margin_px) / (shape[1] * shape[2])))
    defaults = {
        "image": image, "scan": scan,
        "psf": {"sigma_xy_um": _round(sigma_xy), "sigma_z_um": sigma_z_um},
        "background": {"n_bkg": _round(det.n_bkg.value)},
        "detector": det.detector_config(),
        # The movie's region reaches 1 um beyond every edge: as many dots per area there.
        "particles": {"count": {"type": "poisson", "mean": region_count, "max": max(3 * region_count, region_count + 10)},
                      "diffusion_um2_s": diffusion,
                      "n_qd": _n_qd_law(n_qd, spread),
                      "xy_start": {"type": "uniform"},
                      "z_start_um": {"type": "uniform", "low": -1.0, "high": 1.0}},
    }
    # Training patches of 64 x 64 px at the recording's density; the test movie at full size.
    small = {"height_px": 64, "width_px": 64, "pixel_size_um": float(pixel_size_um)}
    per_patch = max(1.0, count * (64 + 2 * margin_px) ** 2 / (shape[1] * shape[2]))
    patch_count = {"type": "poisson", "mean": _round(per_patch), "max": int(3 * per_patch + 6)}
    flyback = {} if frame_flyback_ms is None else {"frame_flyback_ms": float(frame_flyback_ms)}
    config = {
        "seed": seed,
        "defaults": defaults,
        "datasets": {
            "train": {"n_movies": 200, "movie": {"n_frames": 10, "margin_um": 1.0, **flyback}, "image": small,
                      "particles": {"count": patch_count}, "output": {"expected": False, "trajectories": False}},
            "val": {"n_movies": 30, "movie": {"n_frames": 10, "margin_um": 1.0, **flyback}, "image": small,
                    "particles": {"count": patch_count}, "output": {"expected": False, "trajectories": False}},
            "test_movie": {"n_movies": 1, "movie": {"n_frames": min(int(shape[0]), 50), "margin_um": 1.0, **flyback},
                           "output": {"expected": False, "trajectories": True, "trajectory_step": "line"}},
        },
    }
    from factory.config import parse_config

    parse_config(config, source="the calibrated config")  # what is written must build
    _write_yaml(out / "microscope.yaml", config, _header(recording, dark))
    _write_yaml(out / "train.yaml", {
        "model": "spotnet", "model_params": {"widths": [8, 16, 32], "flip_tta": False}, "target": "exposure",
        "train": "train", "val": "val", "val_images": 300, "epochs": 8, "batch_size": 16, "optimizer": "adamw",
        "lr": 0.003, "weight_decay": 0.0001, "schedule": "onecycle", "augment_flips": True, "seed": seed},
        f"# SpotNet for the microscope of {recording.name}: `factory train --config train.yaml --data DATA`\n"
        "# after `factory build microscope.yaml --out DATA`.\n")
    result = {"recording": str(recording), "frames_used": n_used, "dark": None if dark is None else str(dark),
              "detector": det.to_dict(), "spots": None if spots is None else asdict(spots), "first_pass": first,
              "config": defaults, "notes": notes}
    _write_report(out, recording, det, spots, defaults, notes, n_used)
    _plot(out / "calibration.png", frames, config, seed)
    return result


def saturation(frames: np.ndarray) -> tuple[float, float] | None:
    """(ceiling, share of pixels) where a recording piles up at its largest value, else None.

    A pile-up means a saturated detector or digitiser.  Unclipped, the largest value of
    a noisy recording is rare: fewer pixels hold it than the values just below.
    """
    top = frames.max()
    n_top = int(np.count_nonzero(frames == top))
    width = max(1.0, 0.02 * (float(top) - float(np.median(frames))))
    n_below = int(np.count_nonzero((frames >= top - width) & (frames < top)))
    return (float(top), n_top / frames.size) if n_top >= 10 and n_top > n_below else None


def spots_guess(photons: np.ndarray, pixel_size_um: float) -> float:
    """Spots per frame above 5 noise deviations at the paper's PSF scale (the first frames)."""
    s = PAPER_SIGMA_XY_UM / pixel_size_um
    f = photons[0]
    noise = spot_noise(f, s)
    return float(np.mean([len(find_spots(p, s, 5 * max(noise, 1e-6))[0]) for p in photons[:5]]))


def _header(recording: Path, dark) -> str:
    return (f"# The microscope of {recording.name}, estimated by `factory calibrate`"
            f"{'' if dark is None else f' with the dark frames {Path(dark).name}'}.\n"
            "# calibration.md: the estimates, their uncertainties and what was assumed.\n"
            "# Build with `factory build microscope.yaml --out DATA`.\n")


def _write_yaml(path: Path, obj: dict, header: str) -> None:
    import yaml

    class Plain(yaml.SafeDumper):  # every section written out, no &anchors for shared dicts
        def ignore_aliases(self, data):
            return True

    path.write_text(header + yaml.dump(obj, Dumper=Plain, sort_keys=False))


def _fmt(e: Estimate) -> str:
    if not math.isfinite(e.value):
        return "-"
    return f"{e.value:.4g}" + (f" +- {e.sigma:.2g}" if math.isfinite(e.sigma) else "")


def _write_report(out: Path, recording: Path, det: DetectorCalibration, spots, defaults: dict, notes: list[str],
                  n_used: int) -> None:
    rows = [("offset (ADU)", det.offset_adu), ("read noise (ADU)", det.read_noise_adu),
            ("gain x excess noise (ADU per photon)", det.gain_x_enf_adu),
            ("gain (ADU per photon)", det.gain_adu_per_photon), ("excess noise factor", det.excess_noise_factor),
            ("background (ADU above offset)", det.background_adu), ("background (photons per pixel)", det.n_bkg)]
    if spots is not None:
        rows += [("sigma_xy (um)", spots.sigma_xy_um), ("N_qd, median over spots", spots.n_qd)]
    lines = [f"# Calibration of {recording.name}", "",
             f"{n_used} frame(s) used; {det.n_background_px:,} background pixel samples; "
             f"background unevenness over the field {100 * det.unevenness:.1f}%"
             + ("" if spots is None else f"; {spots.n_spots} isolated spots, "
                f"{spots.spots_per_frame:.1f} spots per frame") + ".", "",
             "| quantity | estimate +- standard uncertainty | note |", "| --- | --- | --- |"]
    lines += [f"| {name} | {_fmt(e)} | {e.note} |" for name, e in rows]
    if spots is not None:
        q = spots.n_qd_quantiles
        lines += ["", f"N_qd over spots: 10th / 50th / 90th percentile {q[0]:.3g} / {q[1]:.3g} / {q[2]:.3g}."]
    lines += ["", "Detector written: `" + str(defaults["detector"]) + "`", "",
              "## What the recording did not determine", ""]
    lines += [f"- {n}" for n in notes] or ["- nothing"]
    lines += ["", "![real and simulated frames](calibration.png)", ""]
    (out / "calibration.md").write_text("\n".join(lines))


def _plot(path: Path, frames: np.ndarray, config: dict, seed: int) -> None:
    """Plot a real frame beside a simulated one of the calibrated microscope (same grey scale).

    And the two pixel histograms overlaid.
    """
    from matplotlib.figure import Figure

    from factory.config import parse_config
    from factory.kernel import simulate

    ds_cfg = {**config["defaults"], "n_images": 1, "output": {"expected": False, "trajectories": False}}
    ds_cfg["particles"] = {**ds_cfg["particles"], "diffusion_um2_s": 0.1}
    sim = simulate(parse_config({"seed": seed, "datasets": {"s": ds_cfg}}).datasets["s"], seed)["images"][0]
    real = frames[0]
    lo, hi = np.percentile(real, [0.5, 99.8])
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3)
    for ax, img, title in ((axes[0], real, "recording (frame 0)"), (axes[1], sim, "simulated, calibrated")):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    bins = np.linspace(min(real.min(), sim.min()), max(np.percentile(real, 99.9), np.percentile(sim, 99.9)), 80)
    axes[2].hist(frames[: min(len(frames), 20)].ravel(), bins=bins, density=True, histtype="step", label="recording")
    axes[2].hist(sim.ravel(), bins=bins, density=True, histtype="step", label="simulated")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("pixel value (ADU)", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
