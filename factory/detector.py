"""Detector noise: photon counting (Poisson) or a PMT with gamma-distributed gain."""

from __future__ import annotations

import math

from numba import njit

from .rng import gamma, normal, poisson

POISSON = 0
PMT = 1
UINT16_MAX = 65535.0


@njit(inline="always", cache=True)
def record(state, expected, mode, gain, shape, offset, read_noise):
    """One recorded pixel value for ``expected`` photons.

    PMT: n ~ Poisson(expected) photons, each amplified by a Gamma(shape, gain / shape)
    gain, so the sum of n gains is Gamma(n * shape, gain / shape); the excess noise
    factor is 1 + 1 / shape.  Gaussian read noise (standard deviation ``read_noise``
    ADU) is drawn only when it is on, so stores without it keep their arrays.  Values
    are rounded and clipped to uint16 (0 .. 65535).
    """
    n = poisson(state, expected)
    if mode == POISSON:
        value = float(n)
    else:
        value = offset
        if n > 0:
            value += gamma(state, n * shape) * gain / shape
        if read_noise > 0.0:
            value += read_noise * normal(state)
        value = math.floor(value + 0.5)
        if value < 0.0:
            value = 0.0
    if value > UINT16_MAX:
        value = UINT16_MAX
    return value
