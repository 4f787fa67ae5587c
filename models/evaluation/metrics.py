"""Localisation metrics in physical units, for images (x, y) and z-stacks (x, y, z).

The seed paper's PR-AUC, deepBlink's F1 integral, F1 and RMSE.

Predictions and ground truth are ``Points``: a frame index and a position in
micrometres per point, 2 or 3 coordinates (``models.evaluation.truth`` makes them from
a store and from a detector's table, with the store's pixel size and z step).  Gates
are distances in nanometres; every function here works in micrometres, so one code
path scores images, movies and stacks, and stores of different pixel sizes pool.

PR-AUC at a gate eps (seed paper, Section 4.8): all predictions of a test set are
ranked by score; in that order a prediction is a true positive if it lies within eps
of a ground-truth point of its own image that no higher-ranked prediction has taken,
otherwise a false positive (duplicates included); ground truth never taken is a false
negative.  Precision and recall along the ranking give the PR curve; the AUC is its
area by the trapezoid rule, with the curve held flat from recall 0 to the first point.
Predictions with equal scores enter the curve together (one point per distinct score)
and are matched in (frame, x, y) order, so the result does not depend on input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy.optimize import linear_sum_assignment

F1_INTEGRAL_STEPS = 50


@dataclass(frozen=True)
class Gates:
    """The distances (nm) a dimension is scored at.

    Attributes
    ----------
    auc_nm : tuple of float
        The PR-AUC gates (nm).
    f1_nm : float
        The gate (nm) of the single-number F1 and of the RMSE.
    f1_integral_max_nm : float
        The upper end (nm) of deepBlink's F1 integral, whose cutoffs start at 0.
    """

    auc_nm: tuple[float, ...]
    f1_nm: float
    f1_integral_max_nm: float

    def with_auc(self, auc_nm) -> "Gates":
        """These gates with other PR-AUC gates.

        Parameters
        ----------
        auc_nm : sequence of float
            The PR-AUC gates (nm).

        Returns
        -------
        Gates
            A copy with ``auc_nm`` replaced (as floats), ``f1_nm`` and ``f1_integral_max_nm``
            kept.
        """
        return Gates(tuple(float(g) for g in auc_nm), self.f1_nm, self.f1_integral_max_nm)


# Images: the seed paper's Table 1 (1, 2, 3 px of 0.07 um).  Stacks: the z step is
# several times the pixel size and localisation is worse along z, so the gates are wider.
GATES = {2: Gates((70.0, 140.0, 210.0), 140.0, 210.0), 3: Gates((100.0, 200.0, 300.0), 200.0, 300.0)}
GATES_NM = GATES[2].auc_nm  # Table 1's gates, the default of `factory evaluate --gates-nm`


def gates_for(ndim: int, auc_nm=None) -> Gates:
    """The gates of ``ndim``-dimensional points, with other PR-AUC gates if given.

    Parameters
    ----------
    ndim : {2, 3}
        2: images (x, y); 3: stacks (x, y, z).
    auc_nm : sequence of float, optional
        PR-AUC gates (nm) in place of the dimension's own (``GATES``); the F1 gate and the
        F1-integral range stay.

    Returns
    -------
    Gates
        ``GATES[ndim]``, with ``auc_nm`` when given.

    Raises
    ------
    KeyError
        ``ndim`` is neither 2 nor 3.
    """
    return GATES[ndim] if auc_nm is None else GATES[ndim].with_auc(auc_nm)


def nm_to_px(distance_nm: float, pixel_size_um: float) -> float:
    """A physical distance in pixels of ``pixel_size_um``.

    Rounded to 9 decimals so that 210 nm at 0.07 um is exactly 3 px, not 2.9999999999999996.

    Parameters
    ----------
    distance_nm : float
        The distance (nm).
    pixel_size_um : float
        The pixel size (um).

    Returns
    -------
    float
        The distance (px).

    Raises
    ------
    ValueError
        ``pixel_size_um`` is not > 0.
    """
    if not pixel_size_um > 0:
        raise ValueError(f"pixel_size_um must be > 0, got {pixel_size_um}")
    return round(float(distance_nm) / (float(pixel_size_um) * 1000.0), 9)


def gate_key(gate_nm: float) -> str:
    """The metrics key of a gate: '70', '140', '210' (or '87.5').

    Parameters
    ----------
    gate_nm : float
        The gate (nm).

    Returns
    -------
    str
        The gate in ``%g`` format: the keys of ``auc`` in ``evaluate_points`` and
        ``metrics.json``.
    """
    return f"{float(gate_nm):g}"


@dataclass(frozen=True)
class Points:
    """Points of a set of frames (images or stacks), positions in micrometres.

    Attributes
    ----------
    frame : ndarray
        (M,) int64: the frame (image or stack) index of each point.
    pos_um : ndarray
        (M, ndim) float64: x, y (and z) in um, origin at the centre of pixel (0, 0) (and
        the first plane).  A 1D array given is split into one row per point ((0, 2) when
        there are none).
    n_frames : int
        The frames scored, points or not.

    Raises
    ------
    ValueError
        ``pos_um`` is not one row per entry of ``frame``.
    """

    frame: np.ndarray
    pos_um: np.ndarray
    n_frames: int

    def __post_init__(self):
        frame = np.asarray(self.frame, np.int64).reshape(-1)
        pos = np.asarray(self.pos_um, np.float64)
        if pos.ndim == 1:  # one point, or none
            pos = pos.reshape(len(frame), -1) if len(frame) else pos.reshape(0, 2)
        if pos.ndim != 2 or pos.shape[0] != len(frame):
            raise ValueError(f"Points: pos_um must be (M, ndim) for M={len(frame)} frames, got {pos.shape}")
        object.__setattr__(self, "frame", frame)
        object.__setattr__(self, "pos_um", pos)
        object.__setattr__(self, "n_frames", int(self.n_frames))

    @property
    def ndim(self) -> int:
        """Coordinates per point: 2 (x, y) or 3 (x, y, z)."""
        return int(self.pos_um.shape[1])

    def __len__(self) -> int:
        return len(self.frame)

    @classmethod
    def from_masked(cls, points_um: np.ndarray) -> "Points":
        """From (N, P, ndim) positions (um) that are NaN where there is no point.

        Parameters
        ----------
        points_um : ndarray
            (N, P, ndim) positions (um) per frame and slot; a slot with any non-finite
            coordinate holds no point.

        Returns
        -------
        Points
            The finite slots, frame by frame and in slot order; ``n_frames`` is N.
        """
        mask = np.isfinite(points_um).all(-1)
        return cls(np.nonzero(mask)[0], points_um[mask].astype(np.float64).reshape(-1, points_um.shape[-1]),
                   len(points_um))

    def select(self, keep: np.ndarray) -> "Points":
        """The points ``keep`` selects, over the same frames.

        Parameters
        ----------
        keep : ndarray
            A boolean mask (M,) or indices into the points.

        Returns
        -------
        Points
            The points kept; ``n_frames`` unchanged.
        """
        return Points(self.frame[keep], self.pos_um[keep], self.n_frames)

    @staticmethod
    def concat(parts: list["Points"]) -> "Points":
        """One set of the frames of ``parts`` in turn (frames renumbered).

        Parameters
        ----------
        parts : list of Points
            At least one set, all of one dimension.

        Returns
        -------
        Points
            The frames of each part shifted by the ``n_frames`` of the parts before it;
            ``n_frames`` is their sum.
        """
        offsets = np.cumsum([0] + [p.n_frames for p in parts])
        return Points(np.concatenate([p.frame + o for p, o in zip(parts, offsets)]),
                      np.concatenate([p.pos_um for p in parts]), int(offsets[-1]))

    def offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, offsets): points of frame f are ``order[offsets[f]:offsets[f+1]]``.

        Returns
        -------
        order : ndarray
            Indices of the points sorted by frame (stable: input order within a frame).
        offsets : ndarray
            (n_frames + 1,) start of each frame's points in ``order``.
        """
        order = np.argsort(self.frame, kind="stable")
        offsets = np.searchsorted(self.frame[order], np.arange(self.n_frames + 1))
        return order, offsets


@njit(cache=True)
def _greedy_match(p_frame, p_xy, gt_xy, gt_order, gt_offsets, eps2):
    """True-positive flags of predictions visited in the given (ranked) order."""
    taken = np.zeros(gt_xy.shape[0], np.bool_)
    tp = np.zeros(p_frame.shape[0], np.bool_)
    for i in range(p_frame.shape[0]):
        f = p_frame[i]
        if f < 0 or f + 1 >= gt_offsets.shape[0]:
            continue
        best = -1
        best_d = eps2
        for j in range(gt_offsets[f], gt_offsets[f + 1]):
            g = gt_order[j]
            if taken[g]:
                continue
            d = 0.0
            for a in range(p_xy.shape[1]):
                diff = p_xy[i, a] - gt_xy[g, a]
                d += diff * diff
            if d <= best_d:
                best_d = d
                best = g
        if best >= 0:
            taken[best] = True
            tp[i] = True
    return tp


@njit(cache=True)
def _augment(near, u, mate_p, mate_g, came, queue) -> bool:
    """Grow a matching by an augmenting path from prediction ``u`` (breadth first), if any.

    ``near[a, b]``: prediction a may pair with truth b; ``mate_p`` / ``mate_g`` hold the
    matching (-1 unpaired) and are updated in place; ``came`` and ``queue`` are scratch.
    """
    ng = near.shape[1]
    seen = np.zeros(ng, np.bool_)
    queue[0] = u
    head, tail, end = 0, 1, -1
    while head < tail and end < 0:
        x = queue[head]
        head += 1
        for b in range(ng):
            if near[x, b] and not seen[b]:
                seen[b] = True
                came[b] = x
                if mate_g[b] < 0:
                    end = b
                    break
                queue[tail] = mate_g[b]
                tail += 1
    if end < 0:
        return False
    b = end
    while True:  # flip the path's pairs back to u
        x = came[b]
        nxt = mate_p[x]
        mate_p[x] = b
        mate_g[b] = x
        if x == u:
            return True
        b = nxt


@njit(cache=True)
def _next_frame(p_frame, p_pos, i0, gt_pos, gt_order, gt_offsets):
    """The run of predictions from ``i0`` on that share its frame: its end and distances.

    ``p_*`` sorted by frame; the distances (um) to the frame's truths are computed as
    ``match`` computes them ((n, 0) for a frame without truths or beyond them).
    """
    i1 = i0
    while i1 < p_frame.shape[0] and p_frame[i1] == p_frame[i0]:
        i1 += 1
    f = p_frame[i0]
    g0 = g1 = 0
    if 0 <= f < gt_offsets.shape[0] - 1:
        g0, g1 = gt_offsets[f], gt_offsets[f + 1]
    d = np.empty((i1 - i0, g1 - g0))
    for a in range(i1 - i0):
        for b in range(g1 - g0):
            d2 = 0.0
            for k in range(p_pos.shape[1]):
                diff = p_pos[i0 + a, k] - gt_pos[gt_order[g0 + b], k]
                d2 += diff * diff
            d[a, b] = np.sqrt(d2)
    return i1, d


@njit(cache=True)
def _empty_matching(n_pred, n_true):
    """No pairs yet: ``mate_p``, ``mate_g`` (-1) and ``_augment``'s scratch ``came``, ``queue``."""
    return (np.full(n_pred, -1, np.int64), np.full(n_true, -1, np.int64), np.empty(n_true, np.int64),
            np.empty(n_pred, np.int64))


@njit(cache=True)
def _max_pairs_onsets(p_frame, p_pos, admit_score, gt_pos, gt_order, gt_offsets, gate):
    """Where the maximum number of pairs within ``gate`` grows, as predictions are admitted.

    ``p_*`` are sorted by frame, and within a frame in admission order (score
    descending).  Admitting one prediction raises a maximum matching by at most one
    pair, and when it does, an augmenting path starts at that prediction (Berge: any
    other would already have augmented the matching before it came), so one search per
    admission keeps the matching maximum.  Returns the ``admit_score`` of each
    admission that added a pair: the pairs at cut c are those onsets >= c.
    """
    onsets = np.empty(p_frame.shape[0], np.float64)
    n_on = 0
    i0 = 0
    while i0 < p_frame.shape[0]:
        i1, d = _next_frame(p_frame, p_pos, i0, gt_pos, gt_order, gt_offsets)
        near = d <= gate
        mate_p, mate_g, came, queue = _empty_matching(d.shape[0], d.shape[1])
        for u in range(d.shape[0]):
            if _augment(near, u, mate_p, mate_g, came, queue):
                onsets[n_on] = admit_score[i0 + u]
                n_on += 1
        i0 = i1
    return onsets[:n_on]


@njit(cache=True)
def _max_pairs_by_gate(p_frame, p_pos, gt_pos, gt_order, gt_offsets, gates):
    """The maximum number of pairs within each of the increasing ``gates``, all frames.

    ``p_*`` sorted by frame.  A wider gate only adds possible pairs, so each gate's
    matching starts from the last one's, and one augmenting search from each unpaired
    prediction makes it maximum (Kuhn: a prediction with no augmenting path gains none
    from later augmentations).
    """
    counts = np.zeros(gates.shape[0], np.int64)
    i0 = 0
    while i0 < p_frame.shape[0]:
        i1, d = _next_frame(p_frame, p_pos, i0, gt_pos, gt_order, gt_offsets)
        mate_p, mate_g, came, queue = _empty_matching(d.shape[0], d.shape[1])
        pairs = 0
        for n in range(gates.shape[0]):
            near = d <= gates[n]
            for u in range(d.shape[0]):
                if mate_p[u] < 0 and _augment(near, u, mate_p, mate_g, came, queue):
                    pairs += 1
            counts[n] += pairs
        i0 = i1
    return counts


def _same_ndim(pred: Points, gt: Points) -> None:
    """Refuse to pair 2D points with 3D ones.

    The compiled counters read as many coordinates as the predictions have.
    """
    if len(pred) and len(gt) and pred.ndim != gt.ndim:
        raise ValueError(f"predictions have {pred.ndim} coordinates, the truth {gt.ndim}")


def max_pairs_by_gate(pred: Points, gt: Points, gates_um) -> np.ndarray:
    """The most one-to-one pairs within each gate, frame by frame, for every gate at once.

    The count of pairs ``match`` finds at each gate, without their distances.

    Parameters
    ----------
    pred, gt : Points
        Predictions and ground truth (um); the truth's ``n_frames`` frames are paired.
    gates_um : sequence of float
        Increasing gates (um).

    Returns
    -------
    ndarray
        (K,) int64: pairs per gate.
    """
    gates = np.asarray(gates_um, np.float64)
    if np.any(np.diff(gates) < 0):
        raise ValueError(f"max_pairs_by_gate: gates must increase, got {gates}")
    _same_ndim(pred, gt)
    order = np.argsort(pred.frame, kind="stable")
    g_order, g_off = gt.offsets()
    return _max_pairs_by_gate(pred.frame[order], pred.pos_um[order], gt.pos_um, g_order, g_off, gates)


def max_pairs_by_cut(pred: Points, score, gt: Points, gate_um: float, cuts) -> np.ndarray:
    """The most one-to-one pairs within ``gate_um`` among predictions scored >= each cut.

    Frame by frame, as ``match`` pairs them (its count of pairs at that gate), for every
    cut at once: one pass that admits predictions from the highest score down.

    Parameters
    ----------
    pred : Points
        The predictions (um).
    score : array_like
        (M,) their scores.
    gt : Points
        The ground truth (um); its ``n_frames`` frames are paired.
    gate_um : float
        The largest distance (um) of a pair.
    cuts : array_like
        (K,) score cuts.

    Returns
    -------
    ndarray
        (K,) int64: the number of pairs when the predictions with ``score >= cut`` are kept.
    """
    score = np.asarray(score, np.float64)
    cuts = np.asarray(cuts, np.float64)
    _same_ndim(pred, gt)
    order = np.lexsort((-score, pred.frame))
    g_order, g_off = gt.offsets()
    onsets = _max_pairs_onsets(pred.frame[order], pred.pos_um[order], score[order], gt.pos_um, g_order, g_off,
                               float(gate_um))
    return len(onsets) - np.searchsorted(np.sort(onsets), cuts, side="left")


def rank(pred: Points, score: np.ndarray) -> np.ndarray:
    """Prediction order: score descending, then frame, x, y (input-order independent).

    Parameters
    ----------
    pred : Points
        The predictions.
    score : ndarray
        (M,) their scores (higher: more confident).

    Returns
    -------
    ndarray
        Indices into ``pred``, best ranked first.
    """
    return np.lexsort((pred.pos_um[:, 1], pred.pos_um[:, 0], pred.frame, -np.asarray(score, np.float64)))


def pr_curve(pred: Points, score: np.ndarray, gt: Points, eps_um: float):
    """Precision and recall at each distinct score threshold, highest score first.

    Predictions are matched in ``rank`` order, as the module docstring says: each takes
    the nearest ground-truth point of its own frame within ``eps_um`` that no
    higher-ranked prediction has taken.

    Parameters
    ----------
    pred : Points
        The predictions (um).
    score : ndarray
        (M,) their scores.
    gt : Points
        The ground truth (um) of the same frames.
    eps_um : float
        The gate (um).

    Returns
    -------
    precision, recall : ndarray
        One value per distinct score, from the highest down, each counting every
        prediction scored at least that much; empty without predictions.  Recall is 0
        throughout when there is no ground truth.
    """
    score = np.asarray(score, np.float64)
    n_true = len(gt.frame)
    if len(score) == 0:
        return np.zeros(0), np.zeros(0)
    order = rank(pred, score)
    gt_order, gt_offsets = gt.offsets()
    tp = _greedy_match(pred.frame[order], pred.pos_um[order], gt.pos_um, gt_order, gt_offsets,
                       float(eps_um) ** 2)
    ctp = np.cumsum(tp)
    k = np.arange(1, len(tp) + 1)
    s = score[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    precision = (ctp / k)[last_of_tie]
    recall = (ctp / max(n_true, 1))[last_of_tie] if n_true else np.zeros(int(last_of_tie.sum()))
    return precision, recall


def pr_auc(pred: Points, score: np.ndarray, gt: Points, eps_um: float) -> float:
    """Area under the PR curve (trapezoid rule), the seed paper's AUC.

    The curve (``pr_curve``) is held flat at its first precision from recall 0 to its
    first point.

    Parameters
    ----------
    pred, score, gt, eps_um
        As for ``pr_curve``: predictions, their scores and the truth in um; the gate (um).

    Returns
    -------
    float
        The AUC, in [0, 1]; 0 without predictions.
    """
    precision, recall = pr_curve(pred, score, gt, eps_um)
    if len(precision) == 0:
        return 0.0
    r = np.r_[0.0, recall]
    p = np.r_[precision[0], precision]
    return float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2.0))


def match(pred: Points, gt: Points, cutoffs_um) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Hungarian matching per frame at each cutoff.

    The one-to-one matching of every other score (F1, RMSE, tracks to particles; the F1
    integral and threshold count its pairs with ``max_pairs_by_gate`` and
    ``max_pairs_by_cut``).  The assignment maximises the number of pairs within the
    cutoff, then minimises their total distance.

    Parameters
    ----------
    pred : Points
        The predictions (um).
    gt : Points
        The ground truth (um); its ``n_frames`` frames are matched.
    cutoffs_um : float or sequence of float
        The largest distance (um) of a pair; one matching per cutoff.

    Returns
    -------
    list of tuple of ndarray
        Per cutoff, the matched pairs: (indices into ``pred``, indices into ``gt``,
        distances in um).
    """
    cutoffs = np.atleast_1d(np.asarray(cutoffs_um, np.float64))
    pairs: list[list[tuple]] = [[] for _ in cutoffs]
    p_order, p_off = pred.offsets()
    g_order, g_off = gt.offsets()
    for f in range(gt.n_frames):
        pi = p_order[p_off[f]:p_off[f + 1]]
        gi = g_order[g_off[f]:g_off[f + 1]]
        if len(pi) == 0 or len(gi) == 0:
            continue
        d = np.sqrt(((pred.pos_um[pi, None, :] - gt.pos_um[None, gi, :]) ** 2).sum(-1))
        if min(d.shape) == 1:  # one point on a side: the best match is the nearest one
            k = int(np.argmin(d))
            r, c = np.unravel_index(k, d.shape)
            for n in np.nonzero(d[r, c] <= cutoffs)[0]:
                pairs[n].append((pi[[r]], gi[[c]], d[[r], [c]]))
            continue
        big = 1e6 + d.sum()  # more than any set of pairs inside: count first, then distance
        for n, cut in enumerate(cutoffs):
            inside = d <= cut
            if not inside.any():
                continue
            r, c = linear_sum_assignment(np.where(inside, d, big))
            ok = inside[r, c]
            pairs[n].append((pi[r[ok]], gi[c[ok]], d[r[ok], c[ok]]))
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    return [tuple(np.concatenate(a) for a in zip(*p)) if p else empty for p in pairs]


def match_counts(pred: Points, gt: Points, cutoffs_um) -> tuple[np.ndarray, list[np.ndarray]]:
    """The number of matched pairs per cutoff and, per cutoff, their distances (um).

    Parameters
    ----------
    pred, gt : Points
        Predictions and ground truth (um).
    cutoffs_um : float or sequence of float
        The cutoffs (um), as for ``match``.

    Returns
    -------
    counts : ndarray
        (K,) int64: pairs per cutoff.
    distances : list of ndarray
        Per cutoff, the pairs' distances (um).
    """
    m = match(pred, gt, cutoffs_um)
    return np.array([len(d) for _, _, d in m], np.int64), [d for _, _, d in m]


def f1_cutoffs_um(gates: Gates) -> np.ndarray:
    """The F1-integral cutoffs of deepBlink: 50 from 0 to the gates' maximum, in um.

    Parameters
    ----------
    gates : Gates
        Its ``f1_integral_max_nm`` (nm) is the last cutoff.

    Returns
    -------
    ndarray
        ``F1_INTEGRAL_STEPS`` (50) evenly spaced cutoffs (um), both ends included.
    """
    return np.linspace(0.0, gates.f1_integral_max_nm / 1000.0, F1_INTEGRAL_STEPS)


def f1_integral(pred: Points, gt: Points, cutoffs_um) -> float:
    """The F1 integral of deepBlink: F1 = 2 TP / (n_pred + n_true) averaged over the cutoffs.

    F1 at each cutoff (Hungarian pairs within it) is integrated over the cutoffs by the
    trapezoid rule and divided by their range.

    Parameters
    ----------
    pred, gt : Points
        Predictions and ground truth (um).
    cutoffs_um : sequence of float
        Increasing cutoffs (um), at least two with different values
        (``f1_cutoffs_um``).

    Returns
    -------
    float
        The integral divided by the range; F1 is 1 at every cutoff when there are
        neither predictions nor ground truth.
    """
    cutoffs = np.asarray(cutoffs_um, np.float64)
    tp = max_pairs_by_gate(pred, gt, cutoffs)
    denom = len(pred.frame) + len(gt.frame)
    f1 = 2.0 * tp / denom if denom else np.ones(len(cutoffs))
    return float(np.trapezoid(f1, cutoffs) / (cutoffs[-1] - cutoffs[0]))


def f1_rmse(pred: Points, gt: Points, gate_um: float) -> tuple[float, float]:
    """F1 and the RMSE (um) of Hungarian-matched pairs within ``gate_um``.

    Parameters
    ----------
    pred, gt : Points
        Predictions and ground truth (um).
    gate_um : float
        The gate (um).

    Returns
    -------
    f1 : float
        2 TP / (n_pred + n_true); 1 when both are empty.
    rmse_um : float
        The root mean square distance (um) of the pairs; NaN without pairs.
    """
    tp, dists = match_counts(pred, gt, [gate_um])
    denom = len(pred.frame) + len(gt.frame)
    f1 = 2.0 * tp[0] / denom if denom else 1.0
    rmse = float(np.sqrt(np.mean(dists[0] ** 2))) if len(dists[0]) else float("nan")
    return float(f1), rmse


def best_f1_threshold(pred: Points, score, gt: Points, gate_um: float, n_cuts: int = 200) -> float:
    """The score cut that maximises F1 at ``gate_um`` (candidate cuts: score quantiles).

    Used to pick every detector's operating point on its tuning or validation data.

    Parameters
    ----------
    pred : Points
        The predictions (um).
    score : array_like
        (M,) their scores.
    gt : Points
        The ground truth (um).
    gate_um : float
        The F1 gate (um).
    n_cuts : int
        Candidate cuts: the scores' quantiles at ``n_cuts`` even steps from 0 to 0.995
        (repeated values once).

    Returns
    -------
    float
        The cut (``score >= cut`` counts), in the detector's score units; the lowest of
        equally good cuts; 0.5 without predictions.
    """
    score = np.asarray(score, np.float64)
    if len(score) == 0:
        return 0.5
    cuts = np.unique(np.quantile(score, np.linspace(0, 0.995, n_cuts)))
    # F1 at every cut from one pass (``max_pairs_by_cut``), as ``f1_rmse`` counts it; each
    # cut, a quantile of the scores, keeps at least one prediction, so no denominator is 0.
    tp = max_pairs_by_cut(pred, score, gt, gate_um, cuts)
    f1 = 2.0 * tp / (len(score) - np.searchsorted(np.sort(score), cuts, side="left") + len(gt.frame))
    return float(cuts[int(np.argmax(f1))])  # the first, so the lowest, of equal F1s


def evaluate_points(pred: Points, score: np.ndarray, gt: Points, threshold: float | None = None,
                    gates: Gates | None = None) -> dict:
    """Every metric of one test set (images or stacks), at physical gates.

    The AUCs use every prediction ranked by score; F1, the F1 integral and the RMSE use
    the predictions with ``score >= threshold`` (all when None).  The RMSE is that of
    the Hungarian pairs within the F1 gate; for stacks also split into xy and z, with
    the mean z error (``bias_z_nm``).

    Parameters
    ----------
    pred, score, gt
        As for ``pr_curve``: predictions, their scores and the truth (um); 3D points add
        the stack metrics.
    threshold : float, optional
        The score cut of F1, the F1 integral and the RMSE, in the detector's score units.
    gates : Gates, optional
        Default: ``gates_for(gt.ndim)``.

    Returns
    -------
    dict
        ``auc`` (``gate_key`` -> AUC), ``f1_integral``, ``f1``, ``f1_gate_nm``, ``rmse_nm``
        (nm; NaN without pairs); stacks add ``rmse_xy_nm``, ``rmse_z_nm`` and
        ``bias_z_nm`` (mean z of prediction minus truth, nm); then ``n_images`` (frames
        scored), ``n_true`` and ``n_predictions`` (those above the threshold).
    """
    gates = gates or gates_for(gt.ndim)
    score = np.asarray(score, np.float64)
    auc = {gate_key(g): pr_auc(pred, score, gt, g / 1000.0) for g in gates.auc_nm}
    if threshold is not None:
        pred = pred.select(score >= threshold)
    pi, gi, d = match(pred, gt, [gates.f1_nm / 1000.0])[0]
    denom = len(pred) + len(gt)
    rms_nm = (lambda sq: float(np.sqrt(np.mean(sq)) * 1000.0) if len(sq) else float("nan"))
    m = {
        "auc": auc,
        "f1_integral": f1_integral(pred, gt, f1_cutoffs_um(gates)),
        "f1": float(2.0 * len(d) / denom) if denom else 1.0,
        "f1_gate_nm": gates.f1_nm,
        "rmse_nm": rms_nm(d ** 2),
    }
    if gt.ndim == 3:
        diff = pred.pos_um[pi] - gt.pos_um[gi]
        m.update({"rmse_xy_nm": rms_nm((diff[:, :2] ** 2).sum(1)), "rmse_z_nm": rms_nm(diff[:, 2] ** 2),
                  "bias_z_nm": float(diff[:, 2].mean() * 1000.0) if len(diff) else float("nan")})
    m.update({"n_images": gt.n_frames, "n_true": len(gt), "n_predictions": len(pred)})
    return m
