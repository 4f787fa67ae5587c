"""Expected photons per pixel: Eq. 1 of the two-photon localisation paper.

    N = N_qd / (2 pi sxy^2) exp(-((X-x)^2 + (Y-y)^2) / (2 sxy^2))
        * 1 / (sqrt(2 pi) sz) exp(-(Z-z)^2 / (2 sz^2)) + N_bkg

with the particle at (X, Y, Z), the laser at (x, y, z) and lengths in micrometres.
The functions are written once and serve both engines: compiled into the kernel for
scalars, and called on NumPy arrays by the reference engine.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always", cache=True)
def eq1_amplitude(n_qd, sigma_xy_um, sigma_z_um):
    """Peak signal photons of a particle at the laser focus (Eq. 1 without N_bkg)."""
    return n_qd / (2.0 * np.pi * sigma_xy_um**2) / (np.sqrt(2.0 * np.pi) * sigma_z_um)


@njit(inline="always", cache=True)
def eq1_signal(amplitude, dx_um, dy_um, dz_um, sigma_xy_um, sigma_z_um):
    """Signal part of Eq. 1 for a particle offset (dx, dy, dz) from the laser."""
    return amplitude * np.exp(
        -(dx_um * dx_um + dy_um * dy_um) / (2.0 * sigma_xy_um**2)
        - (dz_um * dz_um) / (2.0 * sigma_z_um**2)
    )
