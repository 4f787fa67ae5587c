"""Quantum-dot blinking: a two-state (on / off) renewal process per particle.

Every on and off period lasts a duration drawn afresh from a truncated power law

    p(t) ~ t^-(1 + alpha)                       t_min <= t <= t_max

(Kuno et al., J. Chem. Phys. 112, 3117, 2000 and 115, 1028, 2001; Frantsuzov et al.,
Nat. Phys. 4, 519, 2008), the on-times optionally damped by an exponential cut-off,
``p(t) ~ t^-(1 + alpha) exp(-t / cutoff)``.  A duration is drawn by the inverse of the
truncated power law's CDF,

    F(t) = (1 - (t_min / t)^alpha) / (1 - (t_min / t_max)^alpha),

and the cut-off by rejection: a draw is kept with probability
``exp(-(t - t_min) / cutoff)`` (at most 1), which leaves exactly the damped law.

The functions are written once for both engines: compiled into the kernel for scalars,
and called on NumPy arrays by the reference engine (``power_law_icdf.py_func``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .rng import uniform


@njit(inline="always", cache=True)
def power_law_icdf(u, alpha, t_min, t_max):
    """The duration whose truncated power-law CDF is ``u`` (in [0, 1))."""
    return t_min * (1.0 - u * (1.0 - (t_min / t_max) ** alpha)) ** (-1.0 / alpha)


@njit(cache=True)
def power_law_duration(state, alpha, t_min, t_max, cutoff):
    """One duration (s) from the truncated power law on [``t_min``, ``t_max``] s.

    Damped by ``exp(-t / cutoff)`` when ``cutoff > 0`` (s); uniforms from ``state``.
    """
    while True:
        t = power_law_icdf(uniform(state), alpha, t_min, t_max)
        if cutoff <= 0.0 or uniform(state) < math.exp(-(t - t_min) / cutoff):
            return t


def power_law_durations(rng: np.random.Generator, n: int, alpha: float, t_min: float, t_max: float,
                        cutoff: float | None) -> np.ndarray:
    """``n`` durations (s) of the same law, drawn with a NumPy Generator."""
    t = power_law_icdf.py_func(rng.random(n), alpha, t_min, t_max)
    if cutoff is not None:
        redo = rng.random(n) >= np.exp(-(t - t_min) / cutoff)
        if redo.any():
            t[redo] = power_law_durations(rng, int(redo.sum()), alpha, t_min, t_max, cutoff)
    return t


def mean_duration_s(alpha: float, t_min: float, t_max: float, cutoff: float | None = None) -> float:
    """Mean of the (damped) truncated power law, by quadrature on a log grid."""
    u = np.linspace(math.log(t_min), math.log(t_max), 20001)
    t = np.exp(u)
    w = t ** (-alpha) * (np.exp(-(t - t_min) / cutoff) if cutoff is not None else 1.0)  # p(t) dt = p(t) t du
    return float(np.trapezoid(w * t, u) / np.trapezoid(w, u))


def laws(spec) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """The laws of the on and of the off durations of a ``config.BlinkingSpec``.

    Each is ``(alpha, t_min s, t_max s, cutoff s or 0)``.
    """
    t_min, t_max = spec.t_min_ms * 1e-3, spec.t_max_s
    return ((spec.alpha_on, t_min, t_max, spec.on_cutoff_s or 0.0),
            (spec.alpha_off, t_min, t_max, 0.0))


def on_probability(spec) -> float:
    """Probability that a particle starts on.

    ``p_on_start``, or the long-run fraction of time on, ``mean_on / (mean_on + mean_off)``.
    """
    if spec.p_on_start is not None:
        return spec.p_on_start
    (a_on, t0, t1, c_on), (a_off, _, _, _) = laws(spec)
    on = mean_duration_s(a_on, t0, t1, c_on or None)
    off = mean_duration_s(a_off, t0, t1)
    return on / (on + off)
