"""Scan timing of a recording, and the time stamp of each localisation."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from factory.config import Dataset, ScanSpec
from factory.scan import frame_period_s, frame_schedule, line_period_s, scan_time_s


@dataclass(frozen=True)
class ScanTiming:
    """The laser's timing, to stamp each localisation with the time it was seen (``models.ScanTiming``).

    The defaults are the seed paper's microscope (the dataset schema's defaults).

    Attributes
    ----------
    dwell_us : float
        Pixel dwell time (us).
    line_retrace_ms : float
        Time from the end of a line's last pixel to the next line's first (ms).
    frame_flyback_ms : float or None
        Time from a frame's last pixel to the next frame's first (ms); None: one line
        retrace.
    bidirectional : bool
        Odd lines are scanned right to left.
    source : str
        Where the values came from, in words (reports and ``describe`` name it).

    Examples
    --------
    >>> t = ScanTiming(dwell_us=2.0, line_retrace_ms=1.1)
    >>> round(t.frame_period_s(24, 25), 6)
    0.0276
    """

    dwell_us: float = ScanSpec().dwell_us
    line_retrace_ms: float = ScanSpec().line_retrace_ms
    frame_flyback_ms: float | None = None  # None: one line retrace
    bidirectional: bool = False
    source: str = "the seed paper's defaults"

    @classmethod
    def of_dataset(cls, dataset: Dataset, source: str) -> "ScanTiming":
        """The timing of a store's typed dataset config (``Store.dataset``); ``source`` names it."""
        scan = dataset.scan
        return cls(scan.dwell_us, scan.line_retrace_ms, dataset.movie.frame_flyback_ms if dataset.movie else None,
                   scan.direction == "bidirectional", source)

    def with_values(self, given_by: str, **values) -> "ScanTiming":
        """A copy with the ``values`` that are given (not None) in place of its own.

        Its ``source`` then names them and ``given_by`` (e.g. "the command line"); with no
        value given, this timing itself.
        """
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            return self
        return replace(self, **given, source=f"{given_by} ({', '.join(given)}) and {self.source}")

    def describe(self) -> str:
        """One line: dwell, retrace, flyback, direction and where they came from."""
        fly = self.line_retrace_ms if self.frame_flyback_ms is None else self.frame_flyback_ms
        return (f"dwell {self.dwell_us:g} us, line retrace {self.line_retrace_ms:g} ms, frame flyback {fly:g} ms, "
                f"{'bidirectional' if self.bidirectional else 'unidirectional'} (from {self.source})")


    def frame_period_s(self, height: int, width: int) -> float:
        """Start of one frame to the start of the next (s) for ``height`` x ``width`` px frames."""
        return frame_period_s(self.schedule(height, width))

    def line_period_s(self, width: int) -> float:
        """Start of one line of ``width`` px to the start of the next (s)."""
        return line_period_s(width, self.dwell_us, self.line_retrace_ms)

    def active_s(self, height: int, width: int) -> float:
        """Time (s) from a frame's first pixel to the end of its last."""
        s = self.schedule(height, width)
        return float(s.start_s[-1] + s.dwell_s)

    def centroid_t_s(self, frame_start_s: np.ndarray, height: int, width: int, particles: int) -> np.ndarray:
        """Time (s) of a whole-frame centroid, (frames, particles).

        Its frame's start (``frame_start_s``, s) plus the mean scan time of the frame's
        pixels, repeated for ``particles`` particles.
        """
        mid = float(self.schedule(height, width).start_s.mean())
        return np.repeat(np.asarray(frame_start_s, np.float64)[:, None] + mid, particles, axis=1)

    def schedule(self, height: int, width: int):
        """The frame's pixel steps in time order (``factory.scan.FrameSchedule``)."""
        return frame_schedule(height, width, self.dwell_us, self.line_retrace_ms, self.bidirectional,
                              self.frame_flyback_ms)


def time_stamps(table: pd.DataFrame, height: int, width: int, timing: ScanTiming, stamps: str,
                frame_start_s: np.ndarray | None = None) -> np.ndarray:
    """``t_s`` of every localisation, from the start of the recording.

    ``stamps="scan"`` (what the laser saw: exposure-target models, TrackPy): frame start +
    the scan time at the localisation.  ``stamps="frame"`` (centroid-target models): frame
    start + the frame's mean pixel time, the time of a whole-frame centroid.  Frames
    follow each other every H W dwell + (H - 1) retrace + flyback unless
    ``frame_start_s`` gives each frame's start.

    Parameters
    ----------
    table : pandas.DataFrame
        Localisations with ``frame``, ``x`` and ``y`` (px).
    height, width : int
        Frame size (px).
    timing : ScanTiming
        The recording's scan timing.
    stamps : {"scan", "frame"}
        Which time (``Detector.timestamps``).
    frame_start_s : ndarray, optional
        Start (s) of every frame of the recording, indexed by ``frame``.

    Returns
    -------
    ndarray
        ``t_s`` (s) per row of ``table``.
    """
    sched = timing.schedule(height, width)
    frame = table["frame"].to_numpy()
    starts = frame * frame_period_s(sched) if frame_start_s is None else np.asarray(frame_start_s)[frame]
    if stamps == "frame":
        return starts + sched.start_s.mean()
    return starts + scan_time_s(table["x"], table["y"], height, width, timing.dwell_us, timing.line_retrace_ms,
                                timing.bidirectional)
