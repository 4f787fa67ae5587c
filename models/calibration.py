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

import numpy as np
from scipy import ndimage

from factory.errors import FactoryError

TILE_PX = 32  # background tiles: small enough to follow unevenness, large enough for k3
MASK_GROW_PX = 4  # masked margin around bright structure (a spot's tail at sigma_xy ~ 3 px)
BOOTSTRAP = 200


@dataclass(frozen=True)
class Estimate:
    """A value with its standard uncertainty (NaN where not determined) and, where the
    recording does not determine it, why and what was assumed."""

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
    """True where ``frame`` is background: not within ``grow_px`` of a pixel where the
    frame, smoothed at a spot's scale (Gaussian, 1.5 px), stands 5 robust standard
    deviations above its median.  The threshold is high so that noise alone almost never
    crosses it: masking the bright side of the noise would shrink the variance and the
    third cumulant that the gain is read from."""
    smooth = ndimage.gaussian_filter(frame.astype(np.float64), 1.5, mode="nearest")
    med = np.median(smooth)
    mad = 1.4826 * np.median(np.abs(smooth - med))
    bright = smooth > med + 5.0 * max(mad, 1e-12)
    if grow_px > 0:
        bright = ndimage.maximum_filter(bright, size=2 * grow_px + 1)
    return ~bright


def tile_power_sums(frames: np.ndarray, tile_px: int = TILE_PX) -> tuple[np.ndarray, float]:
    """Per frame and tile, the sums of 1, x, x^2 and x^3 over background pixels (x relative
    to the first frame's median, for numerical range): (T, tiles, 4) float64."""
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


def _estimate_from_sums(sums: np.ndarray, ref: float, dark: tuple[float, float, float] | None):
    """(offset, read variance, gF, g^2 F (2F - 1), background above offset, per-tile
    background above offset) from power sums summed over frames; ``dark``: the dark
    frames' (mean, variance, third central moment), or None."""
    mean, var, m3, n = _moments(sums, ref)
    if dark is not None:
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
    """Offset, read noise, gain, excess noise factor and background of the detector that
    recorded ``frames`` (T x H x W, ADU), from its background pixels and, if given, dark
    frames (T' x H x W, laser blanked).  See the module docstring."""
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
    sat = float(np.mean(frames >= frames.max())) if frames.dtype.kind in "ui" else 0.0
    if frames.dtype.kind in "ui" and frames.max() >= np.iinfo(frames.dtype).max and sat > 1e-4:
        notes.append(f"{100 * sat:.2g}% of the pixels sit at the largest value of {frames.dtype} "
                     f"({np.iinfo(frames.dtype).max}): saturated; spot brightness is underestimated")

    dark_stats = None
    if dark is not None:
        dark = np.asarray(dark, np.float64)
        if dark.ndim == 2:
            dark = dark[None]
        dark_stats = _dark_stats(dark)
    est = _estimate_from_sums(sums.sum(0), ref, dark_stats)
    if est is None:
        raise FactoryError(f"{source}: the background has one value everywhere; nothing to calibrate from")

    # Bootstrap over frames (and over dark frames): the spread of every estimate.
    boots = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(frames), len(frames))
        d = None
        if dark is not None:
            d = _dark_stats(dark[rng.integers(0, len(dark), len(dark))])
        b = _estimate_from_sums(sums[pick].sum(0), ref, d)
        if b is not None:
            boots.append(b[:5])
    boots = np.array(boots) if boots else np.full((1, 5), np.nan)
    sd = np.nanstd(boots, axis=0) if len(boots) > 1 else np.full(5, np.nan)

    offset, read_var, slope2, slope3, bkg, per_tile = est
    ratio = slope3 / slope2**2 if slope2 > 0 else math.nan  # (2F - 1) / F
    enf = 1.0 / (2.0 - ratio) if ratio < 2 else math.inf
    b_ratio = boots[:, 3] / boots[:, 2] ** 2
    b_enf = np.where(b_ratio < 2, 1.0 / (2.0 - b_ratio), np.nan)
    b_gain = boots[:, 2] / b_enf
    gain = slope2 / enf
    b_nbkg = boots[:, 4] / b_gain

    offset_note = "" if dark is not None else "from the background's spread over the field (no dark frames)"
    if dark is None and (not math.isfinite(offset) or sd[0] > 0.1 * max(abs(bkg), 1.0)):
        offset_note = ("not determined: no dark frames, and the background is too even over the field to "
                       "place the offset; record 20 frames with the laser blanked (--dark)")
        notes.append(f"offset: {offset_note}")
    read_noise = math.sqrt(max(read_var, 0.0))
    read_sd = float(np.nanstd(np.sqrt(np.maximum(boots[:, 1], 0.0))))
    if dark is None:
        notes.append("read noise: without dark frames only its sum with the offset's shot noise is seen; "
                     "it is as uncertain as the offset")
    enf_est = Estimate(enf, float(np.nanstd(b_enf)))
    gain_est = Estimate(gain, float(np.nanstd(b_gain)))
    if not math.isfinite(enf) or enf_est.sigma > 0.5 * max(enf - 1.0, 0.05):
        note = ("not determined: the third cumulant of the background is too noisy to separate gain from "
                "excess noise (too few background pixels or photons)")
        enf_est, gain_est = Estimate(enf, enf_est.sigma, note), Estimate(gain, gain_est.sigma, note)
        notes.append(f"gain and excess noise factor: {note}; only their product g F is determined")
    n_bkg = bkg / gain if gain > 0 else math.nan
    # Unevenness: the spread of per-tile backgrounds beyond what their own noise explains.
    _, var_t, _, n_t = _moments(sums.sum(0), ref)
    rel = per_tile / bkg if bkg > 0 else per_tile
    noise_rel = np.sqrt(var_t / n_t) / max(bkg, 1e-12)
    unevenness = float(np.sqrt(max(np.var(rel) - np.mean(noise_rel**2), 0.0)))
    photon_counting = bool(
        dark is not None and abs(offset) < 0.05 and read_noise < 0.35  # rounding alone: 0.29
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


def _dark_stats(dark: np.ndarray) -> tuple[float, float, float]:
    """Mean, variance and third central moment of dark frames (float64)."""
    mu = float(dark.mean())
    c = dark - mu
    return mu, float((c**2).mean()), float((c**3).mean())
