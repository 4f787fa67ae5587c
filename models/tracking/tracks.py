"""From localisations to tracks and diffusion coefficients, and how good they are.

Linking is frame to frame, solved exactly as an assignment problem
(``models.tracking.linking``), with ``memory`` frames of gap closing.  Its search range follows from a D and the frame period: a
particle moves sqrt(2 D dt) per axis per frame, so a radius of 4 of those (a 2D
displacement beyond it has probability exp(-8) = 3e-4) plus twice the localisation
error, for the geometric middle of the D range expected (``link_diffusion``).  The
default linker (``"adaptive"``) gives a new track that radius, then lets each track's
reach and cost follow its own steps, between the radii for the smallest and the largest
D; ``"radius"`` keeps the one radius for all (``trackpy.link``'s criterion).  Tracks
are then cut at steps their own mobility makes improbable (``split_improbable_steps``).
D per track is the pooled estimator (``models.tracking.diffusion``: one localisation
error for the recording, weighed against the detector's own predicted errors where the
localisations carry a ``sigma``, each track's D from its own steps) on the track's own
time stamps.  ``track_file`` is `factory track`: a recording's file in, its tracks and
their D out.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from factory.config import DatasetSpec
from factory.errors import FactoryError
from factory.stores import Store, is_store_path

from models.detectors.base import Detector
from models.tracking.linking import GATE_SIGMAS, LOCALISATION_PX, link_frames
from models.tracking.diffusion import (blur_coefficient_gaussian, blur_coefficient_uniform, cve, known_sigma, msd_fit,
                                       pooled_sigma2, pooled_sigma2_variance, with_detector_prior)
from models.recordings.predict import load_detector, localise, tiff_pixel_size_um, timing_of, training_datasets
from models.recordings.recording import Recording, check_settings, open_recording
from models.tracking.timing import ScanTiming, time_stamps

log = logging.getLogger(__name__)

MIN_TRACK_POINTS = 5  # positions a track needs for a D estimate
MATCH_SHARE = 0.6  # a track follows a particle when at least this share of its points match it
ESTIMATORS = ("pooled", "cve", "msd")  # the first is the default (models.tracking.diffusion)


def max_diffusion(dataset: DatasetSpec) -> float:
    """The largest D of a dataset config's particles (um^2/s).

    What the linking radius of its movies must allow for; ``dataset`` is a typed
    dataset config (``Store.dataset``, or ``DatasetSpec()`` for the schema's defaults).
    """
    d = dataset.particles.diffusion_um2_s
    return float(d.value if d.type == "fixed" else d.high)


def min_diffusion(dataset: DatasetSpec) -> float:
    """The smallest D of a dataset config's particles (um^2/s)."""
    d = dataset.particles.diffusion_um2_s
    return float(d.value if d.type == "fixed" else d.low)


def search_range_px(max_diffusion_um2_s: float, frame_period_s: float, pixel_size_um: float,
                    localisation_px: float = LOCALISATION_PX) -> float:
    """The linking radius (px) for particles up to ``max_diffusion_um2_s`` (um^2/s).

    ``GATE_SIGMAS`` (4) sqrt(2 D dt) over the frame period ``frame_period_s`` (s), in px
    of ``pixel_size_um`` (um), plus twice ``localisation_px``.
    """
    return GATE_SIGMAS * math.sqrt(2.0 * max_diffusion_um2_s * frame_period_s) / pixel_size_um + 2.0 * localisation_px


def link_diffusion(min_diffusion_um2_s: float, max_diffusion_um2_s: float) -> float:
    """The D (um^2/s) one linking radius is set for: the geometric middle of the range.

    A radius for the largest D joins neighbours in a crowded field; one for the middle
    breaks the fastest particles' tracks now and then, which costs less (measured on
    ``field_val``, README "Tracking fields"); ``split_improbable_steps`` then cuts what a
    radius let through that a track's own mobility does not.  The radius (4 step
    standard deviations at this D) is 4 (D_min / D_max)^(1/4) of the fastest step's: 1.8
    for the fields' 25x range.  On wider ranges (or D_min 0) it is kept at one standard
    deviation of the fastest step at least (D >= D_max / 16), a floor not measured.
    """
    return max(math.sqrt(min_diffusion_um2_s * max_diffusion_um2_s), max_diffusion_um2_s / 16.0)


def own_radius_px(min_diffusion_um2_s: float, max_diffusion_um2_s: float, frame_period_s: float,
                  pixel_size_um: float, radius_px: float | None = None) -> tuple[float, float]:
    """The adaptive linker's smallest and largest reach (px).

    The radii (``search_range_px``) for the ends of the D range (um^2/s), widened to hold
    ``radius_px``, a new track's reach, where one is given.
    """
    lo = search_range_px(min_diffusion_um2_s, frame_period_s, pixel_size_um)
    hi = search_range_px(max_diffusion_um2_s, frame_period_s, pixel_size_um)
    return (lo, hi) if radius_px is None else (min(radius_px, lo), max(radius_px, hi))


def link(table: pd.DataFrame, radius_px: float, memory: int = 1, group: str | None = None,
         own_radius: tuple[float, float] | None = None) -> pd.DataFrame:
    """Add a ``track`` column: ids unique over the table, -1 never occurs.

    Linked by ``models.tracking.linking.link_frames`` (TrackPy's criterion, solved
    exactly) within ``radius_px`` (pixels, as ``x`` and ``y``), with ``memory`` frames of
    gap; with ``own_radius`` (smallest, largest; px) each track's reach follows its own
    steps from ``radius_px`` on (the adaptive linker).  ``group`` (e.g. ``movie``) links
    each group's frames separately.  Returns a new table sorted by (group,) track and
    frame.
    """
    if len(table) == 0:
        return table.assign(track=np.zeros(0, np.int64))
    parts, next_id = [], 0
    groups = table.groupby(group, sort=True) if group else [(None, table)]
    for _, g in groups:
        g = g.reset_index(drop=True)
        ids = link_frames(g["frame"].to_numpy(), g[["x", "y"]].to_numpy(), radius_px, memory, own_radius)
        parts.append(g.assign(track=ids + next_id))
        next_id += int(ids.max()) + 1
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["track", "frame"] if not group else [group, "track", "frame"]).reset_index(drop=True)


# --- a second pass for fields of mixed mobility ------------------------------------------

SPLIT_P = 1e-3  # a step this improbable under its own track's mobility is taken for a wrong link


def _track_starts(*ids: np.ndarray) -> np.ndarray:
    """Rows where a track starts in a table sorted by its keys (``ids``: one array per key)."""
    new = np.zeros(len(ids[0]), bool)
    new[:1] = True
    for k in ids:
        new[1:] |= k[1:] != k[:-1]
    return new


def split_improbable_steps(tracks: pd.DataFrame, p: float = SPLIT_P, min_steps: int = MIN_TRACK_POINTS - 1) -> pd.DataFrame:
    """Cut every track where one step is too long for the track's own mobility.

    In a field of mixed mobility a linking radius that lets the fast particles through
    also lets a slow particle's track jump once to a neighbour or a false detection,
    and one such jump dominates its D.  The track's own scale is robust to a few
    jumps: a 2D Brownian step of per-axis variance v dt has r^2 / dt exponential with
    median 2 ln 2 v, so v is the median of r^2 / dt over 2 ln 2; a step with
    r^2 > 2 ln(1 / ``p``) v dt (probability ``p`` under that law) is cut, and the pieces
    become tracks of their own.  With v known a step is cut with probability ``p``; with
    v from the track's own few steps the false cuts are more (0.3 - 1 % per step for 20 -
    5 steps on simulated Brownian tracks).  Tracks of fewer than ``min_steps`` steps, or
    whose median step is 0, are left whole.  ``tracks`` needs ``track``, ``frame``,
    ``t_s``, ``x``, ``y`` (and ``movie`` when ids repeat across movies); returns it
    sorted by (movie,) track and frame with ``track`` renumbered 0.., unique over the
    table.
    """
    if len(tracks) == 0:
        return tracks
    keys = ["movie", "track"] if "movie" in tracks else ["track"]
    tracks = tracks.sort_values(keys + ["frame"], kind="stable").reset_index(drop=True)
    xy = tracks[["x", "y"]].to_numpy(np.float64)
    t = tracks["t_s"].to_numpy(np.float64)
    new = _track_starts(*(tracks[k].to_numpy() for k in keys))
    starts = np.flatnonzero(new)
    cut = np.zeros(len(tracks), bool)
    limit = 2.0 * math.log(1.0 / p)
    for a, b in zip(starts, np.r_[starts[1:], len(tracks)]):
        if b - a - 1 < min_steps:
            continue
        r2 = ((xy[a + 1:b] - xy[a:b - 1]) ** 2).sum(1)
        dt = np.maximum(np.diff(t[a:b]), 1e-12)
        v = np.median(r2 / dt) / (2.0 * math.log(2.0))
        if v > 0:  # a track that mostly stands still has no scale to judge a step by
            cut[a + 1:b] = r2 > limit * v * dt
    return tracks.assign(track=np.cumsum(new | cut) - 1)


LINKERS = ("adaptive", "radius", "stitch")  # the first is the default
MAX_RADIUS_PX = 1e6  # a linking radius beyond this (a thousand frames across) comes from unphysical settings
STITCH_GAP_FRAMES = 3  # frames a particle may be lost (blinking, a missed detection) and be joined again
STITCH_SIGMAS = 4.0  # a join's radius: this many standard deviations of the step per axis


def stitch(tracks: pd.DataFrame, pixel_size_um: float, frame_period_s: float, d_prior_um2_s: float,
           r: float = 0.0, max_gap_frames: int = STITCH_GAP_FRAMES, localisation_px: float = 1.0,
           min_points: int = MIN_TRACK_POINTS, group: str | None = None) -> pd.DataFrame:
    """Join track fragments end to start, each end with a radius from its own D.

    Linking with a radius for the slowest particles keeps crowded fields apart but
    breaks the fast particles into fragments; each fragment's D (``diffusion_table``'s
    pooled estimate, or ``d_prior_um2_s`` when it has fewer than ``min_points``
    positions) then sets how far
    its particle can have gone by the start of a later fragment (``max_gap_frames`` lost
    frames at most): within ``STITCH_SIGMAS`` standard deviations of that step plus
    twice the localisation error.  Candidate joins are taken by the likelihood of the
    step (a 2D Gaussian of variance 2 D t + sigma_loc^2 per axis), most likely first,
    each end and start used once (Jaqaman et al. 2008's gap closing, solved greedily).
    ``tracks`` needs ``frame``, ``x``, ``y`` (px), ``track`` and ``t_s``; returns it with
    ``track`` renumbered over the joined tracks.  ``group`` (e.g. ``movie``) stitches each
    group's tracks apart.  ``r`` is the positions' motion-blur coefficient (``blur_r``).
    """
    if len(tracks) == 0:
        return tracks
    if group is not None:
        parts, next_id = [], 0
        for _, g in tracks.groupby(group, sort=True):
            g = stitch(g, pixel_size_um, frame_period_s, d_prior_um2_s, r, max_gap_frames, localisation_px, min_points)
            parts.append(g.assign(track=g["track"] + next_id))
            next_id += int(g["track"].max()) + 1
        return pd.concat(parts, ignore_index=True)
    tracks = tracks.sort_values(["track", "frame"], kind="stable").reset_index(drop=True)
    ids = tracks["track"].to_numpy()
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    last = np.r_[first[1:] - 1, len(ids) - 1]
    n_pts = last - first + 1
    d = np.full(len(first), float(d_prior_um2_s))
    long_ = np.flatnonzero(n_pts >= min_points)
    if len(long_):
        est = diffusion_table(tracks, pixel_size_um, r, min_points)
        d_of = dict(zip(est["track"].to_numpy(), est["D_um2_s"].to_numpy()))
        for k in long_:
            v = d_of.get(ids[first[k]], np.nan)
            if np.isfinite(v) and v > 0:
                d[k] = v
    frame = tracks["frame"].to_numpy()
    t = tracks["t_s"].to_numpy(np.float64)
    xy = tracks[["x", "y"]].to_numpy(np.float64) * pixel_size_um
    loc2 = (localisation_px * pixel_size_um) ** 2
    ends_at = pd.Series(np.arange(len(first))).groupby(frame[last]).apply(np.asarray).to_dict()
    starts_at = pd.Series(np.arange(len(first))).groupby(frame[first]).apply(np.asarray).to_dict()
    cand = []  # (cost, end fragment, start fragment)
    for fe, ends in ends_at.items():
        for gap in range(1, max_gap_frames + 2):
            starts = starts_at.get(fe + gap)
            if starts is None:
                continue
            dt = t[first[starts]][None, :] - t[last[ends]][:, None]
            dd = np.maximum(d[ends][:, None], d[starts][None, :])  # the faster of the two
            var = 2.0 * dd * np.maximum(dt, 1e-9) + loc2  # per axis
            dist2 = ((xy[first[starts]][None] - xy[last[ends]][:, None]) ** 2).sum(-1)
            reach = STITCH_SIGMAS * np.sqrt(2.0 * dd * np.maximum(dt, 0.0)) + 2.0 * localisation_px * pixel_size_um
            cost = dist2 / (2.0 * var) + np.log(2.0 * np.pi * var)
            ok = np.nonzero(dist2 <= reach**2)
            cand += zip(cost[ok].tolist(), ends[ok[0]].tolist(), starts[ok[1]].tolist())
    cand.sort()
    nxt = np.full(len(first), -1)
    has_prev = np.zeros(len(first), bool)
    for _, e, s in cand:
        if nxt[e] < 0 and not has_prev[s]:
            nxt[e], has_prev[s] = s, True
    new_id = np.full(len(first), -1)
    k = 0
    for head in np.flatnonzero(~has_prev):
        j = head
        while j >= 0:
            new_id[j] = k
            j = nxt[j]
        k += 1
    return tracks.assign(track=np.repeat(new_id, n_pts)).sort_values(["track", "frame"], kind="stable").reset_index(drop=True)


def blur_r(stamps: str, frame_period_s: float, line_period_s: float, active_s: float,
           sigma_xy_um: float, pixel_size_um: float) -> float:
    """Motion-blur coefficient of the positions a detector reports.

    Centroid stamps (``stamps="frame"``): the mean over the frame's active scan time
    ``active_s`` (uniform).  Scan stamps: what the laser saw, a Gaussian window in time
    of sigma_xy / pixel lines.  Times in s, lengths in um.
    """
    if stamps == "frame":
        return blur_coefficient_uniform(active_s, frame_period_s)
    return blur_coefficient_gaussian(sigma_xy_um / pixel_size_um * line_period_s, frame_period_s)


def diffusion_table(tracks: pd.DataFrame, pixel_size_um: float, r: float = 0.0,
                    min_points: int = MIN_TRACK_POINTS, estimator: str = "pooled",
                    sigma2_loc_um2: float | None = None) -> pd.DataFrame:
    """One row per track with at least ``min_points`` positions: its D estimate.

    ``tracks`` needs ``track``, ``t_s`` (s), ``x`` and ``y`` (px of ``pixel_size_um``);
    with a ``movie`` column, tracks are keyed by movie and track.  ``estimator`` is
    ``"pooled"`` (one localisation error for all the table's tracks, movies included,
    weighed against the median of a ``sigma`` column (px, the detector's own errors)
    where there is one (``with_detector_prior``), or ``sigma2_loc_um2`` (um^2) where
    given, then every track's D from its own steps;
    ``known_sigma``), ``"cve"`` (each track on its own) or ``"msd"``; ``r`` is the blur
    coefficient of steps of one frame (``blur_r``).  The blur is a time (R dt = tau / 6
    for a uniform exposure of tau; Berglund 2010), so with a ``frame`` column a track
    whose steps span g frames on average (gaps: memory, missed detections, a blinking
    particle's off frames) has R = r / g for its own steps.  Columns: (``movie``,)
    ``track, n_frames, D_um2_s, D_low_um2_s, D_high_um2_s, sigma_loc_um``.
    """
    rows = []
    keys = ["movie", "track"] if "movie" in tracks else ["track"]
    # One stable sort and slices of plain arrays, not a DataFrame per track (a long
    # recording has tens of thousands): the tracks in key order, each track's rows in
    # their own order, as groupby gives them.
    order = np.lexsort([tracks[k].to_numpy() for k in reversed(keys)])
    ids = [tracks[k].to_numpy()[order] for k in keys]
    t_all, xy_all = tracks["t_s"].to_numpy()[order], tracks[["x", "y"]].to_numpy()[order] * pixel_size_um
    starts = np.flatnonzero(_track_starts(*ids))
    spans = [(a, b) for a, b in zip(starts, np.r_[starts[1:], len(order)]) if b - a >= min_points]
    rs = [r] * len(spans)
    if "frame" in tracks and r:  # each track's R for its own mean step in frames
        f_all = tracks["frame"].to_numpy(np.float64)[order]
        span_frames = [np.ptp(f_all[a:b]) / max(b - a - 1, 1) for a, b in spans]
        rs = [r / g if g > 0 else r for g in span_frames]
    if estimator == "msd":
        found = [msd_fit(t_all[a:b], xy_all[a:b]) for a, b in spans]
    elif estimator == "pooled" and sigma2_loc_um2 is not None:
        found = [known_sigma(t_all[a:b], xy_all[a:b], sigma2_loc_um2, rk) for (a, b), rk in zip(spans, rs)]
    else:
        found = [cve(t_all[a:b], xy_all[a:b], rk) for (a, b), rk in zip(spans, rs)]
        # Pooled: one localisation variance for the whole table (a store's movies share
        # their microscope) from the tracks' CVEs, then each track's D from its own steps
        # with it (models.tracking.diffusion, known_sigma).  A pool of one track is its CVE.
        if estimator == "pooled" and found and np.isfinite(var := pooled_sigma2_variance(found)):
            s2 = pooled_sigma2(found)
            if "sigma" in tracks:  # the detector's own errors (px), of the localisations in these tracks
                sigma_um = tracks["sigma"].to_numpy(np.float64)[order] * pixel_size_um
                s2, var = with_detector_prior(s2, var, float(np.median(np.concatenate(
                    [sigma_um[a:b] ** 2 for a, b in spans]))))
            found = [known_sigma(t_all[a:b], xy_all[a:b], s2, rk, sigma2_var_um4=var) for (a, b), rk in zip(spans, rs)]
    for (a, b), e in zip(spans, found):
        row = {k: v[a] for k, v in zip(keys, ids)}
        row.update({"n_frames": int(b - a), "D_um2_s": e.D_um2_s, "D_low_um2_s": e.D_low_um2_s,
                    "D_high_um2_s": e.D_high_um2_s, "sigma_loc_um": e.sigma_loc_um})
        rows.append(row)
    cols = keys + ["n_frames", "D_um2_s", "D_low_um2_s", "D_high_um2_s", "sigma_loc_um"]
    return pd.DataFrame(rows, columns=cols)


# --- scoring tracks against a movie store's truth -----------------------------------------


def match_to_truth(table: pd.DataFrame, truth: np.ndarray, gate_px: float, pixel_size_um: float) -> np.ndarray:
    """Truth slot of every localisation (-1: none within ``gate_px``).

    Matched by the evaluation's Hungarian matching per frame
    (``models.evaluation.metrics.match``).  ``truth`` is (frames, P, 2) px, NaN where no target; ``table`` holds ``frame, x, y`` px.
    """
    from models.evaluation.metrics import Points, match

    n = len(truth)
    pred = Points(table["frame"].to_numpy(np.int64), table[["x", "y"]].to_numpy(np.float64) * pixel_size_um, n)
    mask = np.isfinite(truth).all(-1)
    frame, slot_of = np.nonzero(mask)
    pi, gi, _ = match(pred, Points(frame, truth[mask] * pixel_size_um, n), [gate_px * pixel_size_um])[0]
    slot = np.full(len(table), -1, np.int64)
    slot[pi] = slot_of[gi]
    return slot


def score_tracks(tracks: pd.DataFrame, truth: np.ndarray, diffusion: np.ndarray, gate_px: float,
                 pixel_size_um: float, r: float, est: pd.DataFrame | None = None) -> tuple[dict, pd.DataFrame]:
    """Link accuracy and D errors of one movie's tracks.

    ``truth`` (frames, P, 2) and ``diffusion`` (P,) of the movie.  A link joins two
    consecutive localisations of a track.  Links between two localisations matched to
    true particles (within ``gate_px``) are correct when both are the same particle; links
    touching a localisation that matches none (a false or badly placed detection) are
    counted apart.  A track's true D is that of the particle at least ``MATCH_SHARE``
    of its points match (NaN where none does: a track mostly of false detections, or
    of several particles, has no true D).
    Returns the link counts (``links``, ``matched_links``, ``correct_links``) and the D
    table (``est`` where given, e.g. ``diffusion_table`` over a whole store's tracks,
    else ``diffusion_table`` of these tracks) with ``true_D_um2_s``.
    """
    tracks = tracks.sort_values(["track", "frame"]).reset_index(drop=True)
    slot = match_to_truth(tracks, truth, gate_px, pixel_size_um)
    same_track = tracks["track"].to_numpy()[1:] == tracks["track"].to_numpy()[:-1]
    matched = same_track & (slot[1:] >= 0) & (slot[:-1] >= 0)
    correct = matched & (slot[1:] == slot[:-1])
    est = diffusion_table(tracks, pixel_size_um, r) if est is None else est.reset_index(drop=True)
    true_d = []
    for tid in est["track"]:
        s = slot[tracks["track"].to_numpy() == tid]
        counts = np.bincount(s[s >= 0], minlength=1)
        true_d.append(float(diffusion[counts.argmax()]) if counts.max() >= MATCH_SHARE * len(s) else np.nan)
    est["true_D_um2_s"] = np.asarray(true_d, np.float64)
    return {"links": int(same_track.sum()), "matched_links": int(matched.sum()),
            "correct_links": int(correct.sum())}, est


def truth_tracks(truth: np.ndarray, t_s: np.ndarray) -> pd.DataFrame:
    """The true positions as tracks: the floor a perfect localiser and linker would reach.

    One track per particle and run of consecutive frames in view; ``truth`` (frames, P,
    2) px, NaN out of view, and ``t_s`` (frames, P) s.  Columns ``frame, t_s, x, y,
    track, slot``.
    """
    rows = []
    next_id = 0
    for p in range(truth.shape[1]):
        ok = np.isfinite(truth[:, p]).all(-1)
        f = 0
        while f < len(ok):
            if not ok[f]:
                f += 1
                continue
            g = f
            while g < len(ok) and ok[g]:
                g += 1
            for k in range(f, g):
                rows.append((k, t_s[k, p], truth[k, p, 0], truth[k, p, 1], next_id, p))
            next_id += 1
            f = g
    return pd.DataFrame(rows, columns=["frame", "t_s", "x", "y", "track", "slot"])


def d_errors(est: pd.DataFrame, bins=((5, 9), (10, 14), (15, 10**9))) -> dict:
    """Relative bias and RMSE of D per track, overall and by track length."""
    est = est.astype({"true_D_um2_s": np.float64, "D_um2_s": np.float64, "n_frames": np.int64})
    ok = est[np.isfinite(est["true_D_um2_s"]) & np.isfinite(est["D_um2_s"])]
    rel = (ok["D_um2_s"] - ok["true_D_um2_s"]) / ok["true_D_um2_s"]

    def summary(r):
        return {"tracks": int(len(r)), "rel_bias": float(r.mean()) if len(r) else None,
                "rel_rmse": float(np.sqrt((r**2).mean())) if len(r) else None}

    out = summary(rel)
    out["by_length"] = {f"{a}-{b}" if b < 10**9 else f">={a}": summary(rel[(ok["n_frames"] >= a) & (ok["n_frames"] <= b)])
                        for a, b in bins}
    return out


def track_recording(detector: Detector, images: np.ndarray | Recording, timing: ScanTiming, pixel_size_um: float,
                    max_diffusion_um2_s: float, search_range: float | None = None, memory: int = 1,
                    sigma_xy_um: float | None = None, frame_start_s: np.ndarray | None = None,
                    movie_frames: int | None = None, progress: bool = False,
                    estimator: str = ESTIMATORS[0], linker: str = LINKERS[0],
                    min_diffusion_um2_s: float | None = None, split: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Localise (above the detector's threshold), time-stamp, link and estimate D.

    The in-memory core of ``track_file``.

    Parameters
    ----------
    detector : Detector
        A 2D detector; its ``threshold`` selects the localisations and its
        ``timestamps`` their times.
    images : ndarray or Recording
        The frames (N, H, W): an array, or a ``Recording`` localised a chunk at a time
        (``localise``).
    timing : ScanTiming
        The recording's scan timing.
    pixel_size_um : float
        Pixel size (um).
    max_diffusion_um2_s : float
        The largest D expected (um^2/s): with ``min_diffusion_um2_s`` the D range whose
        geometric middle sets the linking radius (``link_diffusion``,
        ``search_range_px``) and whose ends bound the adaptive linker's reach, or with
        ``linker="stitch"`` the D of fragments too short for their own.
    search_range : float, optional
        The linking radius (px), instead of one derived from D and the frame period.
    memory : int
        Frames a particle may vanish and still be linked.
    sigma_xy_um : float, optional
        Lateral PSF sigma (um), for the motion-blur coefficient of scan stamps (default:
        the schema's, the paper's).
    frame_start_s : ndarray, optional
        Start (s) of every frame; default: frames one frame period apart.
    movie_frames : int, optional
        Frames per movie: splits a stack of several movies (a movie store) into its
        movies, linked separately (a ``movie`` column is added).
    progress : bool
        A progress bar (stderr) counting frames.
    estimator : {"pooled", "cve", "msd"}
        D per track (``diffusion_table``): with the localisation error pooled over the
        recording's tracks, covariance-based per track, or an MSD fit.
    linker : {"adaptive", "radius", "stitch"}
        A radius for the geometric middle of the D range for a new track, then each
        track's own, within the radii for the range's ends (``adaptive``); one radius,
        for the middle, for all (``radius``); or a radius for ``min_diffusion_um2_s``,
        then fragments joined by their own D up to ``max_diffusion_um2_s``
        (``stitch``).
    min_diffusion_um2_s : float, optional
        The smallest D expected (um^2/s; default: the largest).
    split : bool
        Cut the tracks at steps improbable under their own mobility
        (``split_improbable_steps``).

    Returns
    -------
    tracks : pandas.DataFrame
        The localisations with ``t_s`` (s), ``track``, ``x_um`` and ``y_um``.
    diffusion : pandas.DataFrame
        D per track (``diffusion_table``).
    used : dict
        The settings used: linker, radius (px) and the D it was set for, the adaptive
        linker's smallest and largest reach (``own_radius_px``), memory, the split's
        probability (None: no split), blur coefficient, frame period (s), time stamps,
        estimator.

    Raises
    ------
    ValueError
        An unknown ``linker``.
    """
    n, h, w = images.shape
    period = timing.frame_period_s(h, w)
    if linker not in LINKERS:
        raise ValueError(f"linker {linker!r}: one of {LINKERS}")
    d_min = min(max_diffusion_um2_s if min_diffusion_um2_s is None else min_diffusion_um2_s, max_diffusion_um2_s)
    first_d = d_min if linker == "stitch" else link_diffusion(d_min, max_diffusion_um2_s)
    search = search_range if search_range is not None else search_range_px(first_d, period, pixel_size_um)
    # A radius given by hand widens the adaptive linker's range to hold it.
    own = own_radius_px(d_min, max_diffusion_um2_s, period, pixel_size_um, search) if linker == "adaptive" else None
    # Settings that are each finite can still give no usable radius (a D of 1e300, a
    # pixel of 1e-300 um): refused before the work.
    radii = [search, *(own or ())]
    if not all(math.isfinite(v) and 0 < v <= MAX_RADIUS_PX for v in radii):
        raise FactoryError(f"the linking radius from these settings is {max(radii):.3g} px (D up to "
                           f"{max_diffusion_um2_s:g} um^2/s, pixel {pixel_size_um:g} um, frame {period:.3g} s); "
                           f"it must be at most {MAX_RADIUS_PX:g} px: give physical values")
    table = localise(detector, images, progress=progress, min_score=detector.threshold)
    stamps = detector.timestamps
    table = table.copy()
    table.insert(1, "t_s", time_stamps(table, h, w, timing, stamps, frame_start_s))
    group = None
    if movie_frames:
        table["movie"] = table["frame"] // movie_frames
        group = "movie"
    if sigma_xy_um is None:  # the schema's default PSF (the paper's)
        sigma_xy_um = DatasetSpec().psf.sigma_xy_um
    r = blur_r(stamps, period, timing.line_period_s(w), timing.active_s(h, w), sigma_xy_um, pixel_size_um)
    tracks = link(table, search, memory, group, own)
    if linker == "stitch":
        tracks = stitch(tracks, pixel_size_um, period, max_diffusion_um2_s, r, group=group)
    if split:
        tracks = split_improbable_steps(tracks)
    tracks["x_um"] = tracks["x"] * pixel_size_um
    tracks["y_um"] = tracks["y"] * pixel_size_um
    used = {"linker": linker, "search_range_px": search, "link_diffusion_um2_s": None if search_range is not None else first_d,
            "own_radius_px": list(own) if own else None, "memory": memory, "split_p": SPLIT_P if split else None,
            "blur_r": r, "frame_period_s": period, "time_stamps": stamps, "estimator": estimator}
    if linker == "stitch":
        used.update(stitch_gap_frames=STITCH_GAP_FRAMES, stitch_max_diffusion_um2_s=max_diffusion_um2_s)
    return tracks, diffusion_table(tracks, pixel_size_um, r, estimator=estimator), used


# Matplotlib's tab20 (0-255): track k is drawn in colour k % 20, in both drawings below.
TRACK_COLOURS = ((31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
                 (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
                 (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199), (188, 189, 34), (219, 219, 141),
                 (23, 190, 207), (158, 218, 229))


def _track_paths(tracks: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Positions (n, 2) in px of the tracks one after the other, and where each starts."""
    t = tracks.sort_values(["track", "frame"] if "frame" in tracks else "track", kind="stable")
    return t[["x", "y"]].to_numpy(np.float64), np.flatnonzero(_track_starts(t["track"].to_numpy()))


def plot_tracks(images: np.ndarray, tracks: pd.DataFrame, out, title: str = "") -> None:
    """Draw the tracks over the recording's mean image into the PNG file ``out``.

    ``images``: the frames (N, H, W), or their mean (H, W), e.g. ``Recording.mean_frame``.
    The mean image is scaled to the grey levels from its minimum to its maximum (pixels
    that are not finite drawn black) and
    enlarged by a whole factor to about 600 px; each track is a line in its colour with a
    dot at its start, the title above.  Drawn with Pillow: every `factory track` call
    writes this picture, and importing matplotlib alone takes a sixth of a short call.
    """
    from PIL import Image, ImageDraw

    mean = np.asarray(images if images.ndim == 2 else images.mean(0), np.float64)
    h, w = mean.shape
    finite = np.isfinite(mean)
    lo, hi = (float(mean[finite].min()), float(mean[finite].max())) if finite.any() else (0.0, 0.0)
    grey = np.zeros((h, w), np.uint8) if hi <= lo else \
        np.round(np.where(finite, mean - lo, 0.0) / (hi - lo) * 255).astype(np.uint8)
    k = max(1, round(600 / max(h, w)))
    band = 18 if title else 0
    canvas = Image.new("RGB", (w * k, h * k + band), "white")
    canvas.paste(Image.fromarray(grey).resize((w * k, h * k), Image.Resampling.NEAREST).convert("RGB"), (0, band))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black")
    xy, first = _track_paths(tracks)
    at = (xy + 0.5) * k + [0, band]  # pixel centres on the enlarged image
    width, dot = max(1, k // 3), max(2, k // 2)
    for n, path in enumerate(np.split(at, first[1:]) if len(first) else []):
        colour = TRACK_COLOURS[n % len(TRACK_COLOURS)]
        if len(path) > 1:
            draw.line([tuple(p) for p in path], fill=colour, width=width, joint="curve")
        x, y = path[0]
        draw.ellipse((x - dot, y - dot, x + dot, y + dot), outline=colour, width=1)
    canvas.save(out, format="PNG")


def draw_tracks(ax, mean: np.ndarray, tracks: pd.DataFrame, title: str = "") -> None:
    """Draw ``tracks`` (``track``, ``x``, ``y`` px) over the image ``mean`` (H, W) on the axes ``ax``."""
    from matplotlib.collections import LineCollection

    h, w = mean.shape
    ax.imshow(mean, cmap="gray", interpolation="nearest")
    # Every path in one collection and every start in one scatter (track k in colour k of
    # TRACK_COLOURS), not two plot calls per track: a long recording has thousands of tracks.
    xy, first = _track_paths(tracks)
    if len(first):
        colours = np.array(TRACK_COLOURS)[np.arange(len(first)) % len(TRACK_COLOURS)] / 255
        ax.add_collection(LineCollection(np.split(xy, first[1:]), colors=colours, linewidths=1.0))
        ax.scatter(xy[first, 0], xy[first, 1], s=9, c=colours, marker="o", linewidths=1.0)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


# --- a recording's file in, tracks and D out: `factory track` ------------------------------

TRACK_FILES = ("tracks.csv", "diffusion.csv", "tracks.png", "track.json")


@dataclass
class TrackResult:
    """What ``track_file`` found, and with which settings.

    Attributes
    ----------
    tracks : pandas.DataFrame
        One row per localisation: ``frame, t_s, x, y, score`` (+ ``sigma``), ``track,
        x_um, y_um``; a movie store adds ``movie`` first (its movies are linked apart).
    diffusion : pandas.DataFrame
        One row per track of at least ``MIN_TRACK_POINTS`` positions: ``track, n_frames,
        D_um2_s, D_low_um2_s, D_high_um2_s, sigma_loc_um`` (D in um^2/s with its 95%
        confidence interval, and the localisation error in um); a movie store adds
        ``movie`` first.
    settings : dict
        What was used (``track.json``): linker, linking radius (``search_range_px``) and
        the D it was set for (``link_diffusion_um2_s``), the adaptive linker's reach
        (``own_radius_px``), memory, the cut's probability
        (``split_p``, None: no cut), blur coefficient, frame period, time stamps,
        estimator, scan timing and its source, pixel size, the D range
        (``min_diffusion_um2_s``, ``max_diffusion_um2_s``), model and target.
    """

    tracks: pd.DataFrame
    diffusion: pd.DataFrame
    settings: dict

    def summary(self) -> str:
        """One line: tracks, tracks with D, their median D."""
        d = self.diffusion
        return (f"{self.tracks['track'].nunique()} tracks, {len(d)} with D (>= {MIN_TRACK_POINTS} frames), "
                f"median D {d['D_um2_s'].median() if len(d) else float('nan'):.3f} um^2/s")


def track_file(model: str | Path, recording: str | Path, out: str | Path | None = None, *,
               pixel_size_um: float | None = None, dwell_us: float | None = None,
               line_retrace_ms: float | None = None, frame_flyback_ms: float | None = None,
               bidirectional: bool | None = None, max_diffusion_um2_s: float | None = None,
               min_diffusion_um2_s: float | None = None, search_range_um: float | None = None, memory: int = 1,
               linker: str = LINKERS[0], estimator: str = ESTIMATORS[0], split: bool = True, device: str = "cpu",
               precision: str = "auto", progress: bool = True, channel: int | None = None,
               report: Callable[[str], None] | None = None, given_by: str = "the arguments") -> TrackResult:
    """Localise, link and estimate D per track in a movie (`factory track`).

    Every frame is localised above the detector's threshold (a network with a head per
    target uses its exposure head: what the laser saw, with its own time stamp, is what
    D needs), each localisation is stamped with the time the laser saw it, linked, and
    each track of at least ``MIN_TRACK_POINTS`` positions gets its D.  The recording is
    read a chunk of frames at a time.

    Parameters
    ----------
    model : str or Path
        What ``models.recordings.predict.load_detector`` takes: a run folder, a ``trackpy.json`` or
        ``"trackpy"``.  2D models only.
    recording : str or Path
        A T x H x W TIFF, or a movie store (every movie tracked, each apart).
    out : str or Path, optional
        A folder to write ``TRACK_FILES`` into: ``tracks.csv``, ``diffusion.csv``,
        ``tracks.png`` (the tracks over the mean frame) and ``track.json`` (the settings).
    pixel_size_um : float, optional
        Default: the store's, else the model's training data's, else the seed paper's.
    dwell_us, line_retrace_ms, frame_flyback_ms : float, optional
        Pixel dwell time (us), line retrace (ms), time from a frame's last pixel to the
        next frame's first (ms; default one line retrace).
    bidirectional : bool, optional
        Scan direction.  Scan timing: these values where given, else the store's, else
        the model's training data, else the seed paper's.
    max_diffusion_um2_s, min_diffusion_um2_s : float, optional
        The D range expected (default: the store's or the training data's, else the
        schema's): the linking radius, 4 sqrt(2 D dt) + 2 px, is for its geometric
        middle (``link_diffusion``), and the adaptive linker's tracks reach between
        the radii for its ends; ``linker="stitch"`` links with a radius for the
        smallest D first.
    search_range_um : float, optional
        The linking radius, instead of one derived from D and the frame period.
    memory : int
        Frames a particle may vanish and still be linked.
    linker : {"adaptive", "radius", "stitch"}
        Each track's reach and cost from its own steps, starting from the radius for the
        middle of the D range (the default); one radius for the middle; or a radius for
        the smallest D and then fragments joined by their own D.
    estimator : {"pooled", "cve", "msd"}
        D per track: with the localisation error pooled over the recording's tracks
        (the default), covariance-based per track (Vestergaard 2014), or an MSD fit.
    split : bool
        Cut tracks at steps improbable under their own mobility (``split_improbable_steps``).
    device : str
        ``"cpu"`` or ``"cuda"``.
    precision : {"auto", "float32", "int8"}
        A network's inference arithmetic: "auto" runs it in 8-bit integers where it can
        (``models.training.runs.RunFolder.detector``), as the command line does.
    progress : bool
        A progress bar (stderr) counting frames.
    channel : int, optional
        The channel (from 0) of a TIFF that holds several (``open_recording``).
    report : callable, optional
        Receives the line saying which scan timing, pixel size and D range were used and
        why; default: this module's logger at INFO.
    given_by : str
        Who gave the timing values, as the reports name them.

    Returns
    -------
    TrackResult
        The tracks, D per track, and the settings used.

    Raises
    ------
    FactoryError
        Bad input (file, model, setting), in one line.
    """
    if linker not in LINKERS:
        raise FactoryError(f"--linker {linker}: unknown (have: {', '.join(LINKERS)})")
    if estimator not in ESTIMATORS:
        raise FactoryError(f"--estimator {estimator}: unknown (have: {', '.join(ESTIMATORS)})")
    check_settings(pixel_size_um=pixel_size_um, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms,
                   frame_flyback_ms=frame_flyback_ms, max_diffusion_um2_s=max_diffusion_um2_s,
                   search_range_um=search_range_um, min_diffusion_um2_s=min_diffusion_um2_s)
    recording = Path(recording)
    if not is_store_path(recording) and recording.suffix.lower() not in (".tif", ".tiff"):
        raise FactoryError(f"{recording}: give a T x H x W TIFF or a movie store (.h5 / .zarr)")
    say = report or log.info
    # The recording is checked before the model is loaded: a bad file is told at once,
    # not after PyTorch's import.
    with open_recording(recording, channel=channel) as images:
        if len(images) < 2:
            raise FactoryError(f"{recording}: one frame of {images.shape[1]} x {images.shape[2]} px; tracking needs a "
                               "movie (T x H x W)")
        det = load_detector(model, device, prefer="exposure", precision=precision)
        if det.ndim == 3:
            raise FactoryError(f"{model}: a 3D model (it localises in z-stacks, Z x H x W); `factory track` links "
                               "localisations through a 2D movie (T x H x W): give a 2D model or 'trackpy'")
        frame_start, movie_frames = None, None
        if is_store_path(recording):
            with Store(recording) as st:
                specs, source = [st.dataset], f"the store {recording}"
                if st.kind != "movies":
                    raise FactoryError(f"{recording}: holds {st.kind}, not movies")
                frame_start, movie_frames = st.read("frame_start_s"), st.dataset.movie.n_frames
        else:
            specs, source = training_datasets(Path(model)) if Path(model).is_dir() else ([], None)
        timing = (timing_of(specs, source) or ScanTiming()).with_values(
            given_by, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms, frame_flyback_ms=frame_flyback_ms,
            bidirectional=bidirectional)
        # Without a dataset config: the schema's defaults (the paper's microscope).  With
        # several training stores: the D range over all of them, the rest from the first.
        specs = specs or [DatasetSpec()]
        px, px_source = pixel_size_um, "the command line"
        if px is None and recording.suffix.lower() in (".tif", ".tiff"):
            px, px_source = tiff_pixel_size_um(recording), f"the TIFF's metadata ({recording})"
        if px is None:
            px, px_source = specs[0].image.pixel_size_um, source or "the schema's defaults"
        d_max = max_diffusion_um2_s if max_diffusion_um2_s is not None else max(max_diffusion(d) for d in specs)
        d_min = min(min_diffusion_um2_s if min_diffusion_um2_s is not None else min(min_diffusion(d) for d in specs),
                    d_max)
        sigma_xy = specs[0].psf.sigma_xy_um
        given = [f for f, v in (("min", min_diffusion_um2_s), ("max", max_diffusion_um2_s)) if v is not None]
        d_source = ("the command line" if len(given) == 2 else
                    (f"the command line ({given[0]}) and " if given else "") + (source or "the schema's defaults (no "
                                                                                "training data found)"))
        say(f"scan timing: {timing.describe()}; pixel {px:g} um (from {px_source}); linking ({linker}) for D from {d_min:g} up to "
            f"{d_max:g} um^2/s (from {d_source})")
        tracks, diff, used = track_recording(det, images, timing, px, d_max,
                                             search_range_um / px if search_range_um else None, memory, sigma_xy,
                                             frame_start, movie_frames, progress=progress, estimator=estimator,
                                             linker=linker, min_diffusion_um2_s=d_min, split=split)
        cols = ["movie"] if "movie" in tracks else []
        cols += ["frame", "t_s", "x", "y", "score"] + (["sigma"] if "sigma" in tracks else []) + ["track", "x_um", "y_um"]
        result = TrackResult(tracks[cols], diff, {**used, "timing": timing.describe(), "pixel_size_um": px,
                                                  "min_diffusion_um2_s": d_min, "max_diffusion_um2_s": d_max,
                                                  "model": str(model),
                                                  "target": det.target,
                                                  "precision": getattr(det, "precision", None)})
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            result.tracks.to_csv(out / "tracks.csv", index=False)
            diff.to_csv(out / "diffusion.csv", index=False)
            first = result.tracks[result.tracks["movie"] == 0] if "movie" in tracks else result.tracks
            plot_tracks(images.mean_frame(movie_frames), first, out / "tracks.png",
                        f"{recording.name}: {first['track'].nunique()} tracks")
            (out / "track.json").write_text(json.dumps(result.settings, indent=2))
    return result
