"""Particle motion: 3D Brownian random walk with independent axes.

A step of duration dt displaces each axis by N(0, 2 D dt).  x and y are kept in pixels
and z in micrometres, so the lateral step is divided by the pixel size.
"""

from __future__ import annotations

import math

from numba import njit

from .rng import normal, normal_pair


@njit(inline="always", cache=True)
def step_std(diffusion_um2_s, dt_s):
    """Standard deviation (um) of one axis' displacement over ``dt_s``."""
    return math.sqrt(2.0 * diffusion_um2_s * dt_s)


@njit(inline="always", cache=True)
def brownian_step(state, pos, p, diffusion_um2_s, dt_s, pixel_size_um):
    """Advance particle ``p`` of ``pos`` (P x 3: x px, y px, z um) by one step."""
    s = step_std(diffusion_um2_s, dt_s)
    if s == 0.0:
        return
    nx, ny = normal_pair(state)
    pos[p, 0] += nx * s / pixel_size_um
    pos[p, 1] += ny * s / pixel_size_um
    pos[p, 2] += normal(state) * s
