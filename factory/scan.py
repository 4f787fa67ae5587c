"""Scan timing of a laser-scanning microscope.

The beam moves along x (columns) at constant speed, one pixel per dwell, then retraces
to the next line (y, rows) without recording.  Time order is the order in which pixels
are recorded: pixel step ``t`` belongs to row ``t // W``.  Bidirectional scans record
every odd line right to left.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always", cache=True)
def pixel_of_step(t, width, bidirectional):
    """(row, column, direction) of the pixel recorded at time step ``t``."""
    row = t // width
    k = t - row * width
    if bidirectional and (row % 2 == 1):
        return row, width - 1 - k, -1.0
    return row, k, 1.0


def pixel_times_s(height: int, width: int, dwell_us: float, retrace_ms: float,
                  bidirectional: bool = False) -> np.ndarray:
    """Start time (s) of every pixel's dwell, as an (H, W) array.

    A line lasts ``W * dwell`` and is followed by the retrace, so pixel (r, c) of a
    unidirectional scan starts at ``r * (W * dwell + retrace) + c * dwell``.
    """
    dwell = dwell_us * 1e-6
    line = width * dwell + retrace_ms * 1e-3
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    k = np.where((rows % 2 == 1) & bidirectional, width - 1 - cols, cols)
    return rows * line + k * dwell


def step_times_s(height: int, width: int, dwell_us: float, retrace_ms: float) -> np.ndarray:
    """Start time (s) of every pixel time step, in time order (length H * W)."""
    t = np.arange(height * width)
    dwell = dwell_us * 1e-6
    return (t // width) * (width * dwell + retrace_ms * 1e-3) + (t % width) * dwell


def frame_time_s(height: int, width: int, dwell_us: float, retrace_ms: float) -> float:
    """Duration of one frame including every line's retrace."""
    return height * (width * dwell_us * 1e-6 + retrace_ms * 1e-3)
