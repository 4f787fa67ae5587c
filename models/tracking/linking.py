"""Frame-to-frame linking: TrackPy's criterion, solved exactly as an assignment problem.

From one frame to the next, each track (seen within the last ``memory`` + 1 frames)
takes at most one localisation at most ``radius_px`` from its last position, each
localisation joins at most one track, and the choice minimises the sum of the squared
displacements, a track left without a localisation costing ``radius_px``^2.  That is the
objective of ``trackpy.link``'s subnetwork linker (Crocker & Grier 1996), here solved
as a sparse linear assignment problem (Jaqaman et al. 2008, as in TrackMate and
laptrack; SciPy's LAPJVsp) instead of by enumeration of each subnetwork.  Two consequences:

- a crowded subnetwork is solved exactly, where TrackPy gives up on one of more than 30
  tracks, or shrinks its radius until it is smaller (its adaptive search);
- neither trackpy nor its Numba linker is imported (about 1.8 s of a short
  `factory track` call).

Localisations left over start new tracks; a track not continued waits up to ``memory``
frames at its last position (gap closing, as TrackPy's ``memory``).
"""

from __future__ import annotations

import numpy as np


def link_frames(frame: np.ndarray, xy: np.ndarray, radius_px: float, memory: int = 1) -> np.ndarray:
    """Track id of every localisation.

    Parameters
    ----------
    frame : ndarray of int, shape (n,)
        Frame of each localisation (any order).
    xy : ndarray, shape (n, 2)
        Its position (px).
    radius_px : float
        The largest displacement linked between consecutive frames of a track (px).
    memory : int
        Frames a track may miss and still be continued.

    Returns
    -------
    ndarray of int64, shape (n,)
        Track ids 0, 1, ... numbered in the order the tracks start (then by row).

    Raises
    ------
    ValueError
        A radius that is not positive and finite, a negative memory, frame numbers that
        are not whole, or positions that are not finite.
    """
    frame = np.asarray(frame)
    if frame.dtype.kind not in "iub" and not (np.isfinite(frame).all() and (frame == np.round(frame)).all()):
        raise ValueError("frame numbers must be whole numbers")
    frame = frame.astype(np.int64)
    xy = np.asarray(xy, np.float64).reshape(len(frame), 2)
    if not (np.isfinite(radius_px) and radius_px > 0):
        raise ValueError(f"radius_px {radius_px}: give a positive number of pixels")
    if memory < 0:
        raise ValueError(f"memory {memory}: give 0 or more frames")
    if not np.isfinite(xy).all():
        raise ValueError("positions must be finite")
    ids = np.full(len(frame), -1, np.int64)
    if not len(frame):
        return ids
    order = np.argsort(frame, kind="stable")
    fr = frame[order]
    starts = np.flatnonzero(np.r_[True, fr[1:] != fr[:-1]])
    stops = np.r_[starts[1:], len(fr)]
    r2 = float(radius_px) ** 2
    # The open tracks: id, last position, last frame.
    open_id = np.zeros(0, np.int64)
    open_xy = np.zeros((0, 2))
    open_last = np.zeros(0, np.int64)
    next_id = 0
    for a, b in zip(starts, stops):
        f = fr[a]
        rows = order[a:b]
        keep = open_last >= f - 1 - memory
        open_id, open_xy, open_last = open_id[keep], open_xy[keep], open_last[keep]
        pts = xy[rows]
        to = _assign(open_xy, pts, r2) if len(open_id) else np.full(0, -1)
        linked = to >= 0
        dest_id = np.full(len(rows), -1, np.int64)
        dest_id[to[linked]] = open_id[linked]
        open_xy[linked] = pts[to[linked]]
        open_last[linked] = f
        new = dest_id < 0
        dest_id[new] = np.arange(next_id, next_id + int(new.sum()))
        next_id += int(new.sum())
        ids[rows] = dest_id
        open_id = np.r_[open_id, dest_id[new]]
        open_xy = np.r_[open_xy, pts[new]]
        open_last = np.r_[open_last, np.full(int(new.sum()), f)]
    return ids


PAIRS_PER_BLOCK = 2**20  # distances computed at once: memory stays flat with thousands of localisations


def _assign(src: np.ndarray, dst: np.ndarray, r2: float) -> np.ndarray:
    """For each source position, the index of the destination it links to, or -1.

    Minimises the summed squared distance of the links plus ``r2`` per unlinked source,
    linking only pairs at most sqrt(``r2``) apart (as TrackPy).
    """
    to = np.full(len(src), -1, np.int64)
    if not len(dst):
        return to
    si, di, d2 = [], [], []
    step = max(1, PAIRS_PER_BLOCK // len(dst))
    for a in range(0, len(src), step):
        d = ((src[a:a + step, None, :] - dst[None, :, :]) ** 2).sum(-1)
        s, t = np.nonzero(d <= r2)
        si.append(s + a)
        di.append(t)
        d2.append(d[s, t])
    si, di, d2 = np.concatenate(si), np.concatenate(di), np.concatenate(d2)
    if not len(si):
        return to
    # Imported here, and the sparse solver rather than scipy.optimize's: a short
    # `factory track` call pays for what it imports.
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    k, m = len(src), len(dst)
    # Columns: the destinations, then one "no link" column per source at r2, so every
    # source is matched.  Each row is matched once, so adding r2 to every cost leaves the
    # optimum where it is; it keeps a zero displacement a stored edge, at the radius's
    # own scale (a fixed offset would swamp the costs of a tiny radius).
    rows = np.r_[si, np.arange(k)]
    cols = np.r_[di, m + np.arange(k)]
    cost = np.r_[d2, np.full(k, r2)] + r2
    r, c = min_weight_full_bipartite_matching(csr_array((cost, (rows, cols)), shape=(k, m + k)))
    real = c < m
    to[r[real]] = c[real]
    return to
