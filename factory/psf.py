"""Expected photons per pixel: Eq. 1 of the two-photon localisation paper.

    N = N_qd / (2 pi sxy^2) exp(-((X-x)^2 + (Y-y)^2) / (2 sxy^2))
        * 1 / (sqrt(2 pi) sz) exp(-(Z-z)^2 / (2 sz^2)) + N_bkg

with the particle at (X, Y, Z), the laser at (x, y, z) and lengths in micrometres.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(inline="always", cache=True)
def eq1_amplitude(n_qd, sigma_xy_um, sigma_z_um):
    """Peak signal photons of a particle at the laser focus (Eq. 1 without N_bkg)."""
    return n_qd / (2.0 * math.pi * sigma_xy_um**2) / (math.sqrt(2.0 * math.pi) * sigma_z_um)


@njit(inline="always", cache=True)
def eq1_signal(amplitude, dx_um, dy_um, dz_um, sigma_xy_um, sigma_z_um):
    """Signal part of Eq. 1 for a particle offset (dx, dy, dz) from the laser."""
    return amplitude * math.exp(
        -(dx_um * dx_um + dy_um * dy_um) / (2.0 * sigma_xy_um**2)
        - (dz_um * dz_um) / (2.0 * sigma_z_um**2)
    )


def expected_photons(X_um, Y_um, Z_um, x_um, y_um, z_um, n_qd, sigma_xy_um, sigma_z_um, n_bkg):
    """Eq. 1, vectorised with NumPy (the reference the kernel is tested against)."""
    X_um, Y_um, Z_um = np.asarray(X_um), np.asarray(Y_um), np.asarray(Z_um)
    lateral = np.exp(-((X_um - x_um) ** 2 + (Y_um - y_um) ** 2) / (2 * sigma_xy_um**2))
    axial = np.exp(-((Z_um - z_um) ** 2) / (2 * sigma_z_um**2))
    return (
        n_qd / (2 * np.pi * sigma_xy_um**2) * lateral
        * axial / (np.sqrt(2 * np.pi) * sigma_z_um)
        + n_bkg
    )
