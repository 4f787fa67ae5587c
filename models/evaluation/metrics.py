"""Localisation metrics: the seed paper's PR-AUC, deepBlink's F1 integral, F1 and RMSE.

Predictions and ground truth are flat tables: ``frame`` (image index), ``x``, ``y``
in pixels (pixel-centre origin) and, for predictions, ``score``.

PR-AUC at a gate eps (seed paper, Section 4.8): all predictions of a test set are
ranked by score; in that order a prediction is a true positive if it lies within eps
of a ground-truth point of its own image that no higher-ranked prediction has taken,
otherwise a false positive (duplicates included); ground truth never taken is a false
negative.  Precision and recall along the ranking give the PR curve; the AUC is its
area by the trapezoid rule, with the curve held flat from recall 0 to the first point.
Predictions with equal scores enter the curve together (one point per distinct score)
and are matched in (frame, x, y) order, so the result does not depend on input order.

Gates are physical distances (the paper's 70 / 140 / 210 nm) and are converted to
pixels per store from its ``pixel_size_um`` (``nm_to_px``); result keys are always the
gates in nanometres.  The matching functions themselves work in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy.optimize import linear_sum_assignment

GATES_NM = (70, 140, 210)  # the seed paper's Table 1 (1, 2, 3 px of 0.07 um)
F1_GATE_NM = 140  # gate of the single-number F1 and RMSE
F1_INTEGRAL_MAX_NM = 210  # deepBlink's F1 integral runs over cutoffs 0 .. 3 px of 0.07 um
F1_INTEGRAL_STEPS = 50


def nm_to_px(distance_nm: float, pixel_size_um: float) -> float:
    """A physical distance in pixels of ``pixel_size_um``.

    Rounded to 9 decimals so that 210 nm at 0.07 um is exactly 3 px, not 2.9999999999999996."""
    if not pixel_size_um > 0:
        raise ValueError(f"pixel_size_um must be > 0, got {pixel_size_um}")
    return round(float(distance_nm) / (float(pixel_size_um) * 1000.0), 9)


def gate_key(gate_nm: float) -> str:
    """The metrics key of a gate: '70', '140', '210' (or '87.5')."""
    return f"{float(gate_nm):g}"


@dataclass
class Points:
    """Points of a set of images, grouped by frame (CSR layout)."""

    frame: np.ndarray  # (M,) int64
    xy: np.ndarray  # (M, 2) float64: x, y (or (M, 3): x, y, z for stacks)
    n_frames: int

    @classmethod
    def from_arrays(cls, frame, x, y, n_frames: int) -> "Points":
        frame = np.asarray(frame, np.int64)
        xy = np.stack([np.asarray(x, np.float64), np.asarray(y, np.float64)], axis=1).reshape(-1, 2)
        return cls(frame, xy, int(n_frames))

    @classmethod
    def from_centroids(cls, centroids: np.ndarray, n_particles: np.ndarray) -> "Points":
        """Ground truth from a store's ``centroids`` (N, P, 2) and ``n_particles`` (N,)."""
        n = len(n_particles)
        mask = np.arange(centroids.shape[1])[None, :] < np.asarray(n_particles)[:, None]
        frame = np.nonzero(mask)[0]
        xy = centroids[mask].astype(np.float64)
        return cls(frame.astype(np.int64), xy.reshape(-1, 2), n)

    @classmethod
    def from_masked(cls, points: np.ndarray) -> "Points":
        """Ground truth from (N, P, d) points that are NaN where there is no target."""
        mask = np.isfinite(points).all(-1)
        frame = np.nonzero(mask)[0]
        d = points.shape[-1]
        return cls(frame.astype(np.int64), points[mask].astype(np.float64).reshape(-1, d), len(points))

    def offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, offsets): points of frame f are ``order[offsets[f]:offsets[f+1]]``."""
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


def rank(pred: Points, score: np.ndarray) -> np.ndarray:
    """Prediction order: score descending, then frame, x, y (input-order independent)."""
    return np.lexsort((pred.xy[:, 1], pred.xy[:, 0], pred.frame, -np.asarray(score, np.float64)))


def pr_curve(pred: Points, score: np.ndarray, gt: Points, eps_px: float):
    """Precision and recall at each distinct score threshold, highest score first."""
    score = np.asarray(score, np.float64)
    n_true = len(gt.frame)
    if len(score) == 0:
        return np.zeros(0), np.zeros(0)
    order = rank(pred, score)
    gt_order, gt_offsets = gt.offsets()
    tp = _greedy_match(pred.frame[order], pred.xy[order], gt.xy, gt_order, gt_offsets,
                       float(eps_px) ** 2)
    ctp = np.cumsum(tp)
    k = np.arange(1, len(tp) + 1)
    s = score[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    precision = (ctp / k)[last_of_tie]
    recall = (ctp / max(n_true, 1))[last_of_tie] if n_true else np.zeros(int(last_of_tie.sum()))
    return precision, recall


def pr_auc(pred: Points, score: np.ndarray, gt: Points, eps_px: float) -> float:
    """Area under the PR curve (trapezoid rule), the seed paper's AUC."""
    precision, recall = pr_curve(pred, score, gt, eps_px)
    if len(precision) == 0:
        return 0.0
    r = np.r_[0.0, recall]
    p = np.r_[precision[0], precision]
    return float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2.0))


def _pairwise(pred: Points, gt: Points):
    """Per frame: the distance matrix between its predictions and its ground truth."""
    p_order, p_off = pred.offsets()
    g_order, g_off = gt.offsets()
    for f in range(gt.n_frames):
        pi = p_order[p_off[f]:p_off[f + 1]]
        gi = g_order[g_off[f]:g_off[f + 1]]
        if len(pi) == 0 or len(gi) == 0:
            yield f, pi, gi, None
            continue
        d = np.sqrt(((pred.xy[pi, None, :] - gt.xy[None, gi, :]) ** 2).sum(-1))
        yield f, pi, gi, d


def match_counts(pred: Points, gt: Points, cutoffs_px) -> tuple[np.ndarray, list[np.ndarray]]:
    """Hungarian matching per frame at each cutoff.

    Returns the number of matched pairs per cutoff and, per cutoff, the distances of
    the matched pairs.  The assignment maximises the number of pairs within the cutoff,
    then minimises their total distance.
    """
    cutoffs = np.atleast_1d(np.asarray(cutoffs_px, np.float64))
    tp = np.zeros(len(cutoffs), np.int64)
    dists: list[list[np.ndarray]] = [[] for _ in cutoffs]
    for _, _pi, _gi, d in _pairwise(pred, gt):
        if d is None:
            continue
        if min(d.shape) == 1:
            # One point on a side: the best match is the nearest one.
            dmin = d.min()
            hit = dmin <= cutoffs
            tp += hit
            for c in np.nonzero(hit)[0]:
                dists[c].append(np.array([dmin]))
            continue
        big = 1e6 + d.sum()
        for c, cut in enumerate(cutoffs):
            inside = d <= cut
            if not inside.any():
                continue
            cost = np.where(inside, d, big)
            r, k = linear_sum_assignment(cost)
            ok = inside[r, k]
            tp[c] += int(ok.sum())
            dists[c].append(d[r[ok], k[ok]])
    return tp, [np.concatenate(x) if x else np.zeros(0) for x in dists]


def f1_cutoffs_px(pixel_size_um: float) -> np.ndarray:
    """deepBlink's F1-integral cutoffs (50 from 0 to 210 nm) in pixels."""
    return np.linspace(0.0, nm_to_px(F1_INTEGRAL_MAX_NM, pixel_size_um), F1_INTEGRAL_STEPS)


def f1_integral(pred: Points, gt: Points, cutoffs_px) -> float:
    """deepBlink's F1 integral: F1 = 2 TP / (n_pred + n_true) integrated over the
    cutoffs and divided by their range."""
    cutoffs = np.asarray(cutoffs_px, np.float64)
    tp, _ = match_counts(pred, gt, cutoffs)
    denom = len(pred.frame) + len(gt.frame)
    f1 = 2.0 * tp / denom if denom else np.ones(len(cutoffs))
    return float(np.trapezoid(f1, cutoffs) / (cutoffs[-1] - cutoffs[0]))


def f1_rmse(pred: Points, gt: Points, gate_px: float) -> tuple[float, float]:
    """F1 and the RMSE (px) of Hungarian-matched pairs within ``gate_px``."""
    tp, dists = match_counts(pred, gt, [gate_px])
    denom = len(pred.frame) + len(gt.frame)
    f1 = 2.0 * tp[0] / denom if denom else 1.0
    rmse = float(np.sqrt(np.mean(dists[0] ** 2))) if len(dists[0]) else float("nan")
    return float(f1), rmse


def best_f1_threshold(frame, xy, score, gt: Points, gate_px: float, n_cuts: int = 200) -> float:
    """The score cut that maximises F1 at ``gate_px`` (candidate cuts: score quantiles).

    Used to pick every detector's operating point on its tuning or validation data."""
    score = np.asarray(score, np.float64)
    if len(score) == 0:
        return 0.5
    frame, xy = np.asarray(frame, np.int64), np.asarray(xy, np.float64).reshape(len(frame), -1)
    cuts = np.unique(np.quantile(score, np.linspace(0, 0.995, n_cuts)))
    best, best_f1 = float(cuts[0]), -1.0
    for c in cuts:
        keep = score >= c
        f1, _ = f1_rmse(Points(frame[keep], xy[keep], gt.n_frames), gt, gate_px)
        if f1 > best_f1:
            best, best_f1 = float(c), f1
    return best


def evaluate_points(pred: Points, score: np.ndarray, gt: Points, pixel_size_um: float,
                    threshold: float | None = None, gates_nm=GATES_NM) -> dict:
    """Every metric of one test set, with physical gates.

    The AUCs use every prediction ranked by score; F1, the F1 integral and RMSE use the
    predictions with ``score >= threshold`` (all when None).  ``pixel_size_um`` converts
    the gates (nm) to the coordinates' pixels.
    """
    score = np.asarray(score, np.float64)
    auc = {gate_key(g): pr_auc(pred, score, gt, nm_to_px(g, pixel_size_um)) for g in gates_nm}
    if threshold is not None:
        keep = score >= threshold
        pred = Points(pred.frame[keep], pred.xy[keep], pred.n_frames)
    f1, rmse_px = f1_rmse(pred, gt, nm_to_px(F1_GATE_NM, pixel_size_um))
    return {
        "auc": auc,
        "f1_integral": f1_integral(pred, gt, f1_cutoffs_px(pixel_size_um)),
        "f1": f1,
        "f1_gate_nm": F1_GATE_NM,
        "rmse_nm": rmse_px * pixel_size_um * 1000.0,
        "rmse_px": rmse_px,
        "pixel_size_um": pixel_size_um,
        "n_images": gt.n_frames,
        "n_true": int(len(gt.frame)),
        "n_predictions": int(len(pred.frame)),
    }


# --- stacks (3D) ----------------------------------------------------------------------

# Stacks are scored in micrometres in 3D (x, y from px by the pixel size; z as stored):
# the z step is several times the pixel size and localisation is worse along z, so the
# gates are wider than in 2D.
GATES_3D_NM = (100, 200, 300)
F1_GATE_3D_NM = 200
F1_INTEGRAL_MAX_3D_NM = 300


def hungarian_pairs(pred: Points, gt: Points, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into pred, into gt) of the Hungarian-matched pairs within ``cutoff``."""
    pi_all, gi_all = [], []
    for _, pi, gi, d in _pairwise(pred, gt):
        if d is None:
            continue
        inside = d <= cutoff
        if not inside.any():
            continue
        r, k = linear_sum_assignment(np.where(inside, d, 1e6 + d.sum()))
        ok = inside[r, k]
        pi_all.append(pi[r[ok]])
        gi_all.append(gi[k[ok]])
    if not pi_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(pi_all), np.concatenate(gi_all)


def evaluate_points_3d(pred_um: Points, score: np.ndarray, gt_um: Points, threshold: float | None = None,
                       gates_nm=GATES_3D_NM) -> dict:
    """Every metric of one stack test set, on (x, y, z) points in micrometres.

    As ``evaluate_points``: PR-AUCs at the 3D gates over every prediction; the F1 integral
    (50 cutoffs from 0 to 300 nm), F1 and the RMSE of matched pairs (at 200 nm) over
    ``score >= threshold``, the RMSE split into xy and z."""
    score = np.asarray(score, np.float64)
    auc = {gate_key(g): pr_auc(pred_um, score, gt_um, g / 1000.0) for g in gates_nm}
    if threshold is not None:
        keep = score >= threshold
        pred_um = Points(pred_um.frame[keep], pred_um.xy[keep], pred_um.n_frames)
    gate = F1_GATE_3D_NM / 1000.0
    f1, rmse = f1_rmse(pred_um, gt_um, gate)
    pi, gi = hungarian_pairs(pred_um, gt_um, gate)
    diff = pred_um.xy[pi] - gt_um.xy[gi]
    rms = (lambda a: float(np.sqrt(np.mean(a)) * 1000.0) if len(a) else float("nan"))
    return {
        "auc": auc,
        "f1_integral": f1_integral(pred_um, gt_um, np.linspace(0.0, F1_INTEGRAL_MAX_3D_NM / 1000.0,
                                                               F1_INTEGRAL_STEPS)),
        "f1": f1,
        "f1_gate_nm": F1_GATE_3D_NM,
        "rmse_nm": rmse * 1000.0,
        "rmse_xy_nm": rms((diff[:, :2] ** 2).sum(1)),
        "rmse_z_nm": rms(diff[:, 2] ** 2),
        "bias_z_nm": float(diff[:, 2].mean() * 1000.0) if len(diff) else float("nan"),
        "n_images": gt_um.n_frames,
        "n_true": int(len(gt_um.frame)),
        "n_predictions": int(len(pred_um.frame)),
    }
