"""Scan timing of a laser-scanning microscope: the one place that knows it.

The beam moves along x (columns) at constant speed, one pixel per dwell, then retraces
to the next line (y, rows) without recording.  Time order is the order in which pixels
are recorded: pixel step ``t`` belongs to row ``t // W``.  Bidirectional scans record
every odd line right to left.

Both engines walk the schedule built here (``frame_schedule``), so the pixel order and
the time between steps are defined once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class FrameSchedule(NamedTuple):
    """One frame's pixel steps in time order (T = H * W entries each)."""

    row: np.ndarray  # (T,) int64: the row recorded at step t
    col: np.ndarray  # (T,) int64: its column
    direction: np.ndarray  # (T,) float64: +1 left to right, -1 right to left
    start_s: np.ndarray  # (T,) float64: start time of the step's dwell, from the frame start
    dt_after_s: np.ndarray  # (T,) float64: time from the end of step t's dwell to the next step
    # (0 within a line, the retrace after a line's last pixel, the frame flyback after the
    # frame's last pixel)
    dwell_s: float


def scan_order(height: int, width: int, bidirectional: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, direction) of every pixel step, in time order."""
    t = np.arange(height * width)
    row = t // width
    k = t - row * width
    reverse = bool(bidirectional) & (row % 2 == 1)
    col = np.where(reverse, width - 1 - k, k)
    return row.astype(np.int64), col.astype(np.int64), np.where(reverse, -1.0, 1.0)


def line_period_s(width: int, dwell_us: float, retrace_ms: float) -> float:
    """Time (s) from the start of one line to the start of the next (dwell us, retrace ms)."""
    return width * dwell_us * 1e-6 + retrace_ms * 1e-3


def frame_schedule(height: int, width: int, dwell_us: float, retrace_ms: float,
                   bidirectional: bool = False, flyback_ms: float | None = None) -> FrameSchedule:
    """The frame's pixel steps in time order.

    ``dwell_us`` per pixel, ``retrace_ms`` after each line; ``flyback_ms`` (default: one
    line retrace) separates the last pixel of a frame from the first of the next.
    """
    row, col, direction = scan_order(height, width, bidirectional)
    t = np.arange(height * width)
    k = t % width
    start = row * line_period_s(width, dwell_us, retrace_ms) + k * (dwell_us * 1e-6)
    dt_after = np.where(k == width - 1, retrace_ms * 1e-3, 0.0)
    dt_after[-1] = (retrace_ms if flyback_ms is None else flyback_ms) * 1e-3
    return FrameSchedule(row, col, direction, start, dt_after, dwell_us * 1e-6)


def frame_period_s(s: FrameSchedule) -> float:
    """Start of one frame to the start of the next (s): H W dwell + (H - 1) retrace + flyback."""
    return float(s.start_s[-1] + s.dwell_s + s.dt_after_s[-1])


def scan_time_s(x, y, height: int, width: int, dwell_us: float, retrace_ms: float,
                bidirectional: bool = False):
    """When (s, from the frame's start) the laser passes a (sub-pixel) position ``x, y`` (px).

    ``y * line period + x * dwell``, with x counted from the right on the reversed
    (odd) lines of a bidirectional scan.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if bidirectional:
        odd = np.rint(y).astype(np.int64) % 2 == 1
        x = np.where(odd, (width - 1) - x, x)
    return y * line_period_s(width, dwell_us, retrace_ms) + x * (dwell_us * 1e-6)


def pixel_times_s(height: int, width: int, dwell_us: float, retrace_ms: float,
                  bidirectional: bool = False) -> np.ndarray:
    """Start time (s) of every pixel's dwell, as an (H, W) image.

    A line lasts ``W * dwell`` and is followed by the retrace, so pixel (r, c) of a
    unidirectional scan starts at ``r * (W * dwell + retrace) + c * dwell``.
    """
    s = frame_schedule(height, width, dwell_us, retrace_ms, bidirectional)
    out = np.empty((height, width))
    out[s.row, s.col] = s.start_s
    return out


def step_times_s(height: int, width: int, dwell_us: float, retrace_ms: float) -> np.ndarray:
    """Start time (s) of every pixel time step, in time order (length H * W)."""
    return frame_schedule(height, width, dwell_us, retrace_ms).start_s


def frame_time_s(height: int, width: int, dwell_us: float, retrace_ms: float) -> float:
    """Duration (s) of one frame including every line's retrace."""
    return height * line_period_s(width, dwell_us, retrace_ms)
