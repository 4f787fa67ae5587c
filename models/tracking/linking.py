"""Frame-to-frame linking: TrackPy's criterion, solved exactly as an assignment problem.

From one frame to the next, each track (seen within the last ``memory`` + 1 frames)
takes at most one localisation at most ``radius_px`` from its last position, each
localisation joins at most one track, and the choice minimises the sum of the squared
displacements, a track left without a localisation costing ``radius_px``^2.  That is the
objective of ``trackpy.link``'s subnetwork linker (Crocker & Grier 1996), here solved
as a sparse linear assignment problem (Jaqaman et al. 2008, as in TrackMate and
laptrack; SciPy's LAPJVsp, or the Hungarian method on a dense matrix for a few
contested tracks) instead of by enumeration of each subnetwork.  Two consequences:

- a crowded subnetwork is solved exactly, where TrackPy gives up on one of more than 30
  tracks, or shrinks its radius until it is smaller (its adaptive search);
- neither trackpy nor its Numba linker is imported (about 1.8 s of a short
  `factory track` call).

Localisations left over start new tracks; a track not continued waits up to ``memory``
frames at its last position (gap closing, as TrackPy's ``memory``).

With ``own_radius`` each track's reach follows its own steps (the adaptive linker,
`factory track`'s default).  In a field of mixed mobility one radius is either too
small for the fast particles (their tracks break into pieces too short for a D) or
large enough for a slow particle to jump to a neighbour.  So each track carries v, the
variance of its step per axis and frame: the mean of its own squared steps (per axis,
per frame of gap), shrunk towards the variance that ``radius_px`` is set for with the
weight of ``PRIOR_STEPS`` steps (so a new track reaches ``radius_px``, as with one
radius, or two localisation errors where ``radius_px`` is smaller).  It reaches
``GATE_SIGMAS`` sqrt(v g) + 2 localisation errors over a gap of g frames, kept within
``own_radius``, which holds ``radius_px``.  A link costs its squared length over the track's
own variance, v g + sigma_loc^2: the Gaussian negative log-likelihood of the step, less
a term per track that the assignment ignores (each track is assigned once).  In squared
pixels instead, a fast track's long step would outweigh a slow neighbour's short one,
and the fast track would take the slow one's localisation.  Not linking costs what a
step at the edge of the reach costs.  Measured on the fields (README "Tracking
fields"), this gets D right for more particles than one radius.
"""

from __future__ import annotations

import numpy as np

PRIOR_STEPS = 2.0  # weight (in steps) of the prior variance in a track's own variance
GATE_SIGMAS = 4.0  # a track's reach: this many standard deviations of its step per axis
LOCALISATION_PX = 1.0  # the localisation error assumed in reach and cost (as search_range_px's)


def link_frames(frame: np.ndarray, xy: np.ndarray, radius_px: float, memory: int = 1,
                own_radius: tuple[float, float] | None = None) -> np.ndarray:
    """Track id of every localisation.

    Parameters
    ----------
    frame : ndarray of int, shape (n,)
        Frame of each localisation (any order).
    xy : ndarray, shape (n, 2)
        Its position (px).
    radius_px : float
        The largest displacement linked between consecutive frames of a track (px); with
        ``own_radius``, that of a track without steps yet (at least two localisation
        errors, ``2 * LOCALISATION_PX``).
    memory : int
        Frames a track may miss and still be continued.
    own_radius : (float, float), optional
        The smallest and largest reach (px) of a track whose reach follows its own steps
        (the adaptive linker), ``radius_px`` between them; None: every track reaches
        ``radius_px``.

    Returns
    -------
    ndarray of int64, shape (n,)
        Track ids 0, 1, ... numbered in the order the tracks start (then by row).

    Raises
    ------
    ValueError
        A radius that is not positive and finite, an ``own_radius`` whose smallest is
        above its largest or that does not hold ``radius_px``, a negative memory, frame numbers that are not whole, or
        positions that are not finite.
    """
    frame = np.asarray(frame)
    if frame.dtype.kind not in "iub" and not (np.isfinite(frame).all() and (frame == np.round(frame)).all()):
        raise ValueError("frame numbers must be whole numbers")
    frame = frame.astype(np.int64)
    xy = np.asarray(xy, np.float64).reshape(len(frame), 2)
    if not (np.isfinite(radius_px) and radius_px > 0):
        raise ValueError(f"radius_px {radius_px}: give a positive number of pixels")
    if own_radius is not None:
        r_lo, r_hi = (float(v) for v in own_radius)
        if not (np.isfinite(r_lo) and np.isfinite(r_hi) and 0 < r_lo <= r_hi):
            raise ValueError(f"own_radius {own_radius}: give the smallest and the largest reach, 0 < smallest <= largest")
        if not r_lo <= radius_px <= r_hi:
            raise ValueError(f"own_radius {own_radius} does not hold radius_px {radius_px}, a new track's reach")
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
    # The prior variance: the one whose reach is radius_px.
    v0 = (max(float(radius_px) - 2.0 * LOCALISATION_PX, 0.0) / GATE_SIGMAS) ** 2
    # The open tracks: id, last position, last frame, and (adaptive) the sum of their
    # squared steps per frame and their number of steps.
    open_id = np.zeros(0, np.int64)
    open_xy = np.zeros((0, 2))
    open_last = np.zeros(0, np.int64)
    open_sum = np.zeros(0)
    open_n = np.zeros(0)
    next_id = 0
    for a, b in zip(starts, stops):
        f = fr[a]
        rows = order[a:b]
        keep = open_last >= f - 1 - memory
        open_id, open_xy, open_last = open_id[keep], open_xy[keep], open_last[keep]
        open_sum, open_n = open_sum[keep], open_n[keep]
        pts = xy[rows]
        if own_radius is None:
            gate2, scale = np.full(len(open_id), r2), np.ones(len(open_id))
        else:
            gap = (f - open_last).astype(np.float64)
            v = (open_sum / 2.0 + PRIOR_STEPS * v0) / (open_n + PRIOR_STEPS)
            gate2 = np.clip(GATE_SIGMAS * np.sqrt(v * gap) + 2.0 * LOCALISATION_PX, r_lo, r_hi) ** 2
            scale = v * gap + LOCALISATION_PX**2
        to = _assign(open_xy, pts, gate2, scale) if len(open_id) else np.full(0, -1)
        linked = to >= 0
        dest_id = np.full(len(rows), -1, np.int64)
        dest_id[to[linked]] = open_id[linked]
        if own_radius is not None:
            open_sum[linked] += ((pts[to[linked]] - open_xy[linked]) ** 2).sum(1) / gap[linked]
            open_n[linked] += 1
        open_xy[linked] = pts[to[linked]]
        open_last[linked] = f
        new = dest_id < 0
        k = int(new.sum())
        dest_id[new] = np.arange(next_id, next_id + k)
        next_id += k
        ids[rows] = dest_id
        open_id = np.concatenate((open_id, dest_id[new]))
        open_xy = np.concatenate((open_xy, pts[new]))
        open_last = np.concatenate((open_last, np.full(k, f)))
        open_sum = np.concatenate((open_sum, np.zeros(k)))
        open_n = np.concatenate((open_n, np.zeros(k)))
    return ids


PAIRS_PER_BLOCK = 2**20  # distances computed at once: memory stays flat with thousands of localisations


def _assign(src: np.ndarray, dst: np.ndarray, gate2: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """For each source position, the index of the destination it links to, or -1.

    Source i links only to destinations within sqrt(``gate2[i]``); a link costs its
    squared length over ``scale[i]``, leaving source i unlinked ``gate2[i] / scale[i]``,
    and the sum is minimised.  With one radius and ``scale`` 1 that is TrackPy's
    criterion.
    """
    to = np.full(len(src), -1, np.int64)
    if not len(dst):
        return to
    si, di, d2 = [], [], []
    step = max(1, PAIRS_PER_BLOCK // len(dst))
    for a in range(0, len(src), step):
        d = ((src[a:a + step, None, :] - dst[None, :, :]) ** 2).sum(-1)
        s, t = np.nonzero(d <= gate2[a:a + step, None])
        si.append(s + a)
        di.append(t)
        d2.append(d[s, t])
    si, di, d2 = np.concatenate(si), np.concatenate(di), np.concatenate(d2)
    # A source and a destination within reach of each other and of nothing else form a
    # problem of their own, solved by linking them: the link costs d2 / scale, less than
    # the gate2 / scale of leaving the source unlinked (an unmatched destination costs
    # nothing).  Only the contested rest goes to a solver: a few pairs or none in a
    # sparse field, solved densely here (SciPy's import is a fifth of a second).
    alone = (np.bincount(si, minlength=len(src))[si] == 1) & (np.bincount(di, minlength=len(dst))[di] == 1)
    to[si[alone]] = di[alone]
    si, di, d2 = si[~alone], di[~alone], d2[~alone]
    if not len(si):
        return to
    # The sources and destinations of the contested pairs, numbered afresh.
    srcs, si = np.unique(si, return_inverse=True)
    dsts, di = np.unique(di, return_inverse=True)
    solve = _solve_dense if max(len(srcs), len(dsts)) <= DENSE_MAX else _solve
    sub = solve(si, di, d2, gate2[srcs], scale[srcs], len(dsts))
    to[srcs[sub >= 0]] = dsts[sub[sub >= 0]]
    return to


DENSE_MAX = 16  # contested sources (or destinations) up to which a frame's problem is solved densely here


def _solve_dense(si: np.ndarray, di: np.ndarray, d2: np.ndarray, gate2: np.ndarray, scale: np.ndarray,
                 m: int) -> np.ndarray:
    """`_solve` for a few contested pairs: the Hungarian method on a dense square.

    Without SciPy, whose import is a fifth of a second of a short call.  Source i's
    total is gate2_i / scale_i less the saving (gate2_i - d2) / scale_i of its link, if
    any, so the links are the matching of largest total saving; a pair out of reach
    saves nothing and, in the square padded with zeros, stands for no link.  A pair
    within reach is a link even at the gate itself (saving 0), as where it is
    uncontested.  Where two assignments have exactly the same total (whole-pixel
    positions can tie; sub-pixel localisations practically never do) the tie may be
    broken otherwise than SciPy breaks it.
    """
    k = len(gate2)
    n = max(k, m)
    cost = np.zeros((n, n))
    cost[si, di] = -(gate2[si] - d2) / scale[si]
    within = np.zeros((n, n), bool)
    within[si, di] = True
    # Columns 1..n, rows 1..n; row_of[j] the row on column j (0: none), column 0 the root.
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    row_of = np.zeros(n + 1, np.int64)
    way = np.zeros(n + 1, np.int64)
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, bool)
        while True:
            used[j0] = True
            reduced = cost[row_of[j0] - 1] - u[row_of[j0]] - v[1:]
            better = ~used[1:] & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            free = np.where(used[1:], np.inf, minv[1:])
            j1 = int(np.argmin(free)) + 1
            delta = free[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # flip the augmenting path back to the root
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    to = np.full(k, -1, np.int64)
    rows, cols = row_of[1:] - 1, np.arange(n)
    real = (rows < k) & (cols < m)
    rows, cols = rows[real], cols[real]
    linked = within[rows, cols]  # an out-of-reach pair is no link
    to[rows[linked]] = cols[linked]
    return to


def _solve(si: np.ndarray, di: np.ndarray, d2: np.ndarray, gate2: np.ndarray, scale: np.ndarray,
           m: int) -> np.ndarray:
    """`_assign`'s assignment for the pairs (``si``, ``di``), solved exactly.

    ``d2`` is each pair's squared length, ``m`` the number of destinations; every source
    has a pair.  Returns, per source, its destination (< ``m``) or -1.
    """
    # Imported here, and the sparse solver rather than scipy.optimize's: a short
    # `factory track` call pays for what it imports.
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    k = len(gate2)
    to = np.full(k, -1, np.int64)
    # Columns: the destinations, then one "no link" column per source at its gate's cost,
    # so every source is matched.  Each row is matched once, so adding one value to every
    # cost leaves the optimum where it is; the largest gate cost keeps a zero
    # displacement a stored edge, at the costs' own scale (a fixed offset would swamp the
    # costs of a tiny radius).
    rows = np.concatenate((si, np.arange(k)))
    cols = np.concatenate((di, m + np.arange(k)))
    unlinked = gate2 / scale
    cost = np.concatenate((d2 / scale[si], unlinked)) + unlinked.max()
    r, c = min_weight_full_bipartite_matching(csr_array((cost, (rows, cols)), shape=(k, m + k)))
    real = c < m
    to[r[real]] = c[real]
    return to
