"""Diffusion coefficients of tracks: the covariance-based estimator and the MSD fit.

Positions sampled at times t_n with localisation variance s^2 and motion-blur
coefficient R have, per axis (Berglund 2010):

    <dx_n^2>          = 2 D dt + 2 (s^2 - 2 R D dt)
    <dx_n dx_{n+1}>   = -(s^2 - 2 R D dt)

so the covariance-based estimator (CVE; Vestergaard, Blainey & Flyvbjerg, Phys. Rev. E
89, 022726, 2014) is, per axis,

    D   = <dx^2> / (2 dt) + <dx_n dx_{n+1}> / dt
    s^2 = R <dx^2> + (2 R - 1) <dx_n dx_{n+1}>

The D estimate does not depend on R.  Each localisation carries its own time stamp
(the scan time at the particle for what the laser saw), so the steps are irregular:
``dt`` is the mean of the track's own steps, which keeps the moment estimator unbiased
(the optimal weights of Vestergaard et al. 2016 are not used).  Its variance, per axis,
is D^2 [(6 + 4 e + 2 e^2) / N + 4 (1 + e)^2 / N^2] with e = s^2 / (D dt) - 2 R and N
displacements (Vestergaard et al. 2014, Eq. 17); x and y are independent, so the
two-axis estimate has half that variance.

When the localisation variance s^2 is known, the first of those equations alone gives D
(``known_sigma``):

    D = (<dx^2> - 2 s^2) / (2 dt (1 - 2 R))

and its variance per axis is D's share of Var(<dx^2>) = (2 a^2 N + 4 b^2 (N - 1)) / N^2
with a = <dx^2> and b = s^2 - 2 R D dt (Gaussian steps whose neighbours covary by -b).
With s^2 small against D dt that is about 2 D^2 / N against the CVE's 6 D^2 / N: the
CVE spends two thirds of its precision on estimating s^2 from the track itself.  In a
recording of many particles, s^2 is one number for all of them (the same microscope,
PSF and photon counts within a spread), so ``pooled`` takes it from all tracks at once:
the median of the tracks' own CVE estimates of s^2 (at least 0), then each track's D
from its own steps, its interval widened by the pool's own uncertainty
(``pooled_sigma2_variance``).  A pool of one track is that track's CVE.

Where the detector predicts each localisation's error, the pool is weighed against
the median of those (``with_detector_prior``): at long frame times (0.4 s for a 256-line
frame) the tracks' estimates of s^2 scatter far more than s^2 itself, and the pool of a
few dozen tracks is noise against it.

The MSD fit (``msd_fit``) is the alternative: a straight line through the first p
points of the MSD curve, p chosen as Michalet (2010) advises for the slope,
p = 2 + 2.3 x^0.52 with the reduced localisation error x = s^2 / (D dt), iterated from
the fit's own x.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from statistics import NormalDist


@dataclass(frozen=True)
class DiffusionEstimate:
    """One track's D with its confidence interval (um^2/s) and localisation error.

    Attributes
    ----------
    D_um2_s, D_low_um2_s, D_high_um2_s : float
        The estimate and its confidence interval (the lower end stops at 0); NaN when
        the track has too few displacements.
    sigma_loc_um : float
        Localisation error per axis (um); NaN where the estimate of its square is < 0.
    n_displacements : int
        Displacements the estimate used.
    method : str
        ``"cve"``, or ``"msd (p=...)"`` with the points fitted.
    sigma2_loc_um2 : float
        The (unbiased, possibly negative) estimate of sigma_loc^2 (um^2).
    """

    D_um2_s: float
    D_low_um2_s: float
    D_high_um2_s: float
    sigma_loc_um: float  # localisation error per axis (NaN where the estimate of s^2 < 0)
    n_displacements: int
    method: str
    sigma2_loc_um2: float = float("nan")  # the (unbiased, possibly negative) estimate of s^2

    def as_dict(self) -> dict:
        """The fields as a dict."""
        return asdict(self)


def _z(confidence: float) -> float:
    """The standard normal quantile of a two-sided interval of ``confidence``.

    From the standard library (statistics.NormalDist): importing scipy.stats for it
    took half a second.
    """
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _steps(t_s, xy_um):
    t = np.asarray(t_s, np.float64)
    xy = np.asarray(xy_um, np.float64).reshape(len(t), -1)
    order = np.argsort(t, kind="stable")
    t, xy = t[order], xy[order]
    return np.diff(t), np.diff(xy, axis=0)


def blur_coefficient_uniform(exposure_s: float, interval_s: float) -> float:
    """Motion-blur coefficient R of a position averaged uniformly over ``exposure_s`` of each ``interval_s``.

    R = exposure / (6 interval) (Berglund 2010); 1/6 for continuous illumination.
    """
    return exposure_s / (6.0 * interval_s)


def blur_coefficient_gaussian(window_sd_s: float, interval_s: float) -> float:
    """Motion-blur coefficient R of a position weighted in time by a Gaussian of standard deviation ``window_sd_s``.

    The Gaussian is the laser's pass over a particle; ``interval_s`` = dt is the time
    between positions.  R = (1 / dt) integral S (1 - S) = window_sd / (sqrt(pi) dt),
    with S the Gaussian's cumulative distribution.
    """
    return window_sd_s / (math.sqrt(math.pi) * interval_s)


def cve(t_s, xy_um, blur_r: float = 0.0, confidence: float = 0.95) -> DiffusionEstimate:
    """Covariance-based estimate of D (um^2/s) from one track.

    Parameters
    ----------
    t_s : array_like
        Time of each position (n,), s; sorted here.
    xy_um : array_like
        Positions (n, d), um; the d axes are treated as independent and pooled.
    blur_r : float
        Motion-blur coefficient R of the positions for steps of the track's mean step
        (``blur_coefficient_uniform``, ``blur_coefficient_gaussian``: the blur time over
        that step); it enters only the localisation error.
    confidence : float
        Coverage of the interval ``D_low_um2_s .. D_high_um2_s``.

    Returns
    -------
    DiffusionEstimate
        NaN estimates below 2 displacements.
    """
    dt, dx = _steps(t_s, xy_um)
    n = len(dt)
    if n < 2:
        nan = float("nan")
        return DiffusionEstimate(nan, nan, nan, nan, n, "cve", nan)
    mean_dt = float(dt.mean())
    m2 = (dx**2).mean(axis=0)
    m11 = (dx[1:] * dx[:-1]).mean(axis=0)
    d_axes = m2 / (2 * mean_dt) + m11 / mean_dt
    D = float(d_axes.mean())
    s2 = float((blur_r * m2 + (2 * blur_r - 1) * m11).mean())
    var = _cve_variance(max(D, 1e-12), max(s2, 0.0), mean_dt, blur_r, n) / dx.shape[1]
    z = _z(confidence)
    half = z * math.sqrt(var)
    # D >= 0: the interval's lower end stops at 0 (the estimate itself is left unbiased).
    return DiffusionEstimate(D, max(D - half, 0.0), D + half, math.sqrt(s2) if s2 > 0 else float("nan"), n, "cve", s2)


def known_sigma(t_s, xy_um, sigma2_loc_um2: float, blur_r: float = 0.0, confidence: float = 0.95,
                sigma2_var_um4: float = 0.0) -> DiffusionEstimate:
    """D (um^2/s) of one track whose localisation variance is known.

    Parameters
    ----------
    t_s, xy_um : array_like
        Times (s) and positions (um) as for ``cve``.
    sigma2_loc_um2 : float
        Localisation variance per axis (um^2), e.g. pooled over a recording's tracks
        (``pooled_sigma2``).
    blur_r : float
        Motion-blur coefficient R of the positions for steps of the track's mean step
        (as for ``cve``); here it enters D (``cve``'s estimate does not depend on it).
    confidence : float
        As for ``cve``.
    sigma2_var_um4 : float
        Variance of ``sigma2_loc_um2`` (um^4; ``pooled_sigma2_variance``), added to the
        interval's: 0 for an s^2 known exactly.

    Returns
    -------
    DiffusionEstimate
        ``method`` ``"known_sigma"``; NaN estimates below 2 displacements.
    """
    dt, dx = _steps(t_s, xy_um)
    n = len(dt)
    s2 = float(sigma2_loc_um2)
    if n < 2:
        nan = float("nan")
        return DiffusionEstimate(nan, nan, nan, nan, n, "known_sigma", s2)
    mean_dt = float(dt.mean())
    scale = 2.0 * mean_dt * (1.0 - 2.0 * blur_r)
    if not scale > 0:  # time stamps that do not advance (or R >= 1/2): no rate to estimate
        nan = float("nan")
        return DiffusionEstimate(nan, nan, nan, nan, n, "known_sigma", s2)
    D = float((dx**2).mean() - 2.0 * s2) / scale
    d_plug = max(D, 0.0)
    a = d_plug * scale + 2.0 * s2  # <dx^2> per axis
    b = s2 - 2.0 * blur_r * d_plug * mean_dt  # minus the covariance of neighbouring steps
    var = (2.0 * a**2 * n + 4.0 * b**2 * (n - 1)) / n**2 / scale**2 / dx.shape[1]
    var += 4.0 * sigma2_var_um4 / scale**2  # the same s^2 enters every axis
    half = _z(confidence) * math.sqrt(var)
    return DiffusionEstimate(D, max(D - half, 0.0), D + half, math.sqrt(s2) if s2 >= 0 else float("nan"), n,
                             "known_sigma", s2)


def pooled_sigma2(estimates: list[DiffusionEstimate], min_displacements: int = 9) -> float:
    """One localisation variance (um^2) for a recording: the median of its tracks' CVE estimates.

    Tracks of at least ``min_displacements`` displacements count (all tracks with an
    estimate when fewer than two are that long); the median keeps a few wrongly linked tracks
    (whose jumps inflate their s^2) from moving it.  A negative median (the estimates
    scatter by about D dt / sqrt(N) around a small s^2) is read as 0, the physical
    bound; otherwise one track gives its own CVE back.  NaN when no track has an
    estimate.
    """
    use = _pool(estimates, min_displacements)
    return max(float(np.median(use)), 0.0) if len(use) else float("nan")


def pooled_sigma2_variance(estimates: list[DiffusionEstimate], min_displacements: int = 9) -> float:
    """Variance (um^4) of ``pooled_sigma2``: that of a median, pi / 2 times the mean's.

    From the scatter of the same tracks' estimates (what a few wrong links add counts
    too, so it errs wide); NaN with fewer than two such tracks.
    """
    use = _pool(estimates, min_displacements)
    return float(math.pi / 2 * use.var(ddof=1) / len(use)) if len(use) >= 2 else float("nan")


DETECTOR_PRIOR_SD = 0.5  # relative: how far a detector's own error variance is trusted to be off


def with_detector_prior(pool_sigma2_um2: float, pool_var_um4: float, detector_sigma2_um2: float,
                        prior_sd: float = DETECTOR_PRIOR_SD) -> tuple[float, float]:
    """A recording's localisation variance from its pool and its detector's own errors.

    A detector that predicts each localisation's error (SpotNet's sigma) says what s^2
    should be: ``detector_sigma2_um2``, e.g. the median of its predicted variances.
    Its calibration may be off, which the pool of the tracks' CVE estimates measures
    (``pooled_sigma2``, variance ``pooled_sigma2_variance``).  The two are weighed by
    their variances, the detector's being (``prior_sd`` s^2)^2: where the pool is
    precise (many tracks whose D dt is small against s^2) it decides; where it is noise
    (at 0.4 s frames the tracks' estimates of s^2 scatter by D dt / sqrt(N), far above
    s^2) the detector's s^2 does.  Returns (s^2, its variance), um^2 and um^4.
    """
    if not (pool_var_um4 > 0 and detector_sigma2_um2 > 0):  # an exact pool stands; a detector's 0 says nothing
        return pool_sigma2_um2, pool_var_um4
    w_pool, w_det = 1.0 / pool_var_um4, 1.0 / (prior_sd * detector_sigma2_um2) ** 2
    w = w_pool + w_det
    return (pool_sigma2_um2 * w_pool + detector_sigma2_um2 * w_det) / w, 1.0 / w


def _pool(estimates: list[DiffusionEstimate], min_displacements: int) -> np.ndarray:
    """The s^2 estimates a pool is made of.

    The tracks of ``min_displacements`` or more where there are two or more such tracks
    (a pool's variance needs two), else every track with an estimate.
    """
    s2 = np.array([e.sigma2_loc_um2 for e in estimates], np.float64)
    n = np.array([e.n_displacements for e in estimates])
    ok = np.isfinite(s2)
    long_ = ok & (n >= min_displacements)
    return s2[long_] if long_.sum() >= 2 else s2[ok]


def _cve_variance(D: float, s2: float, dt: float, R: float, n: int) -> float:
    e = s2 / (D * dt) - 2 * R
    return D**2 * ((6 + 4 * e + 2 * e**2) / n + 4 * (1 + e) ** 2 / n**2)


def _msd_line(lags: np.ndarray, msd: np.ndarray, dt: float, p: int, d: int) -> tuple[float, float]:
    """D and s^2 from the least-squares line through the first ``p`` MSD points (``d`` axes)."""
    slope, offset = np.polyfit(lags[:p] * dt, msd[:p], 1)
    return float(slope / (2 * d)), float(offset / (2 * d))


def msd_fit(t_s, xy_um, confidence: float = 0.95, max_iter: int = 10) -> DiffusionEstimate:
    """D (um^2/s) from a least-squares line through the first p points of the time-averaged MSD.

    Lags are in steps of the track's mean step; p by Michalet's rule, iterated at most
    ``max_iter`` times (where the rule cycles between values, the fewest points of the
    cycle); the method names the p whose fit gives D.  ``t_s`` (n,) s and ``xy_um``
    (n, d) um as for ``cve``; NaN estimates below 3 displacements.
    """
    t = np.sort(np.asarray(t_s, np.float64))
    xy = np.asarray(xy_um, np.float64)[np.argsort(np.asarray(t_s, np.float64), kind="stable")]
    n = len(t) - 1
    d = xy.shape[1]
    if n < 3:
        nan = float("nan")
        return DiffusionEstimate(nan, nan, nan, nan, n, "msd")
    dt = float(np.diff(t).mean())
    lags = np.arange(1, n)
    msd = np.array([((xy[k:] - xy[:-k]) ** 2).sum(1).mean() for k in lags])
    p, tried = 2, []
    for _ in range(max_iter):
        D, s2 = _msd_line(lags, msd, dt, p, d)
        tried.append(p)
        x = max(s2, 0.0) / max(D * dt, 1e-12)
        p_new = int(min(max(2, round(2 + 2.3 * x**0.52)), n - 1))
        if p_new == p:
            break
        if p_new in tried:  # the rule cycles (e.g. 4 -> 5 -> 4): the fewest points of the cycle
            p = min(tried[tried.index(p_new):])
            D, s2 = _msd_line(lags, msd, dt, p, d)
            break
        p = p_new
    else:  # no fixed point within max_iter: the last p tried, with its own fit
        D, s2 = _msd_line(lags, msd, dt, p, d)
    # Uncertainty: the CVE's variance formula at the same D and s^2 (an approximation
    # for the fit; the MSD points are correlated).
    var = _cve_variance(max(D, 1e-12), max(s2, 0.0), dt, 0.0, n) / d
    half = _z(confidence) * math.sqrt(var)
    return DiffusionEstimate(float(D), max(float(D - half), 0.0), float(D + half),
                             math.sqrt(s2) if s2 > 0 else float("nan"), n, f"msd (p={p})", float(s2))
