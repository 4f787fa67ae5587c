"""Metrics: hand-computed cases and the properties any ranking metric must have."""

import numpy as np
import pandas as pd
import pytest

from models.evaluation.evaluate import score_table
from models.evaluation.metrics import (GATES_NM, Points, best_f1_threshold, evaluate_points, f1_cutoffs_um, f1_integral,
                                       f1_rmse, gates_for, match_counts, max_pairs_by_cut, max_pairs_by_gate, nm_to_px,
                                       pr_auc, pr_curve)
from models.evaluation.truth import Geometry

CUT = np.linspace(0, 3, 50)  # deepBlink's cutoffs at 0.07 um per pixel


def pts(rows, n_frames):
    rows = np.asarray(rows, float).reshape(-1, 3)
    return Points(rows[:, 0], rows[:, 1:3], n_frames)


GT = pts([[0, 5, 5], [1, 10, 10], [2, 3, 4], [2, 15, 15]], 3)


def test_hand_computed_pr_curve_and_auc():
    # Ranked: TP (frame 0), FP (far), TP (frame 2, first point), duplicate of it (FP).
    pred = pts([[0, 5.5, 5], [1, 20, 20], [2, 3, 4.2], [2, 3.1, 4]], 3)
    score = np.array([0.9, 0.8, 0.7, 0.6])
    p, r = pr_curve(pred, score, GT, 1.0)
    np.testing.assert_allclose(p, [1, 1 / 2, 2 / 3, 2 / 4])
    np.testing.assert_allclose(r, [1 / 4, 1 / 4, 2 / 4, 2 / 4])
    # Trapezoids: flat 1.0 over [0, .25], then [.25, .5] between 2/3 and 2/4... by hand:
    expected = 0.25 * 1.0 + 0 * (1 + 0.5) / 2 + 0.25 * (0.5 + 2 / 3) / 2 + 0
    assert pr_auc(pred, score, GT, 1.0) == pytest.approx(expected)


def test_perfect_predictions_score_one_everywhere():
    score = np.linspace(1, 0.5, 4)
    assert pr_auc(GT, score, GT, 1.0) == pytest.approx(1.0)
    assert f1_integral(GT, GT, CUT) == pytest.approx(1.0)  # matched at every cutoff, even 0
    f1, rmse = f1_rmse(GT, GT, 2.0)
    assert f1 == 1.0 and rmse == 0.0


def test_f1_integral_by_hand():
    # Every prediction 0.5 px off: F1 = 0 below the 0.5 cutoff, 1 from it on.
    pred = Points(GT.frame, GT.pos_um + [0.5, 0.0], 3)
    f1 = (CUT >= 0.5).astype(float)
    assert f1_integral(pred, GT, CUT) == pytest.approx(np.trapezoid(f1, CUT) / 3)
    f1v, rmse = f1_rmse(pred, GT, 2.0)
    assert f1v == 1.0 and rmse == pytest.approx(0.5)


def test_predictions_beyond_the_gate_score_zero():
    pred = Points(GT.frame, GT.pos_um + 2.5, 3)
    score = np.ones(4)
    for gate in (1.0, 2.0, 3.0):
        assert pr_auc(pred, score, GT, gate) == (0.0 if gate < 2.5 * np.sqrt(2) else pytest.approx(1.0))
    assert f1_rmse(pred, GT, 2.0)[0] == 0.0


def test_order_of_images_and_predictions_does_not_matter():
    rng = np.random.default_rng(3)
    n = 200
    gt = Points(np.arange(n), rng.uniform(0, 20, (n, 2)), n)
    m = 600
    frame = rng.integers(0, n, m)
    pred = Points(frame, np.stack([gt.pos_um[frame, 0] + rng.normal(0, 1.2, m), gt.pos_um[frame, 1] + rng.normal(0, 1.2, m)], 1), n)
    score = rng.integers(0, 20, m).astype(float)  # many ties
    base = [pr_auc(pred, score, gt, g) for g in (1, 2, 3)]
    perm = rng.permutation(m)
    shuffled = Points(pred.frame[perm], pred.pos_um[perm], n)
    assert [pr_auc(shuffled, score[perm], gt, g) for g in (1, 2, 3)] == base
    # Renumber the images.
    relabel = rng.permutation(n)
    gt2 = Points(relabel[gt.frame], gt.pos_um, n)
    pred2 = Points(relabel[pred.frame], pred.pos_um, n)
    np.testing.assert_allclose([pr_auc(pred2, score, gt2, g) for g in (1, 2, 3)], base)
    assert f1_integral(shuffled, gt, CUT) == pytest.approx(f1_integral(pred, gt, CUT))


def test_a_duplicate_of_a_true_positive_is_a_false_positive():
    gt = pts([[0, 5, 5]], 1)
    pred = pts([[0, 5, 5], [0, 5.1, 5]], 1)
    p, r = pr_curve(pred, np.array([2.0, 1.0]), gt, 1.0)
    np.testing.assert_allclose(p, [1.0, 0.5])
    np.testing.assert_allclose(r, [1.0, 1.0])
    f1, _ = f1_rmse(pred, gt, 2.0)
    assert f1 == pytest.approx(2 * 1 / 3)


def test_greedy_ranking_takes_the_nearest_truth_but_hungarian_maximises_matches():
    """Truth at x = 0 and 1.5; prediction A at 0.76 is nearer the second (0.74 vs 0.76),
    prediction B at 2.3 can only reach the second (0.8).  The paper's greedy ranking lets
    A take the second and leaves B unmatched; Hungarian matching pairs A with the first
    and B with the second."""
    gt = pts([[0, 0, 0], [0, 1.5, 0]], 1)
    pred = pts([[0, 0.76, 0], [0, 2.3, 0]], 1)
    p, r = pr_curve(pred, np.array([2.0, 1.0]), gt, 0.8)
    np.testing.assert_allclose(p, [1.0, 0.5])  # greedy: B is a false positive
    np.testing.assert_allclose(r, [0.5, 0.5])
    tp, dists = match_counts(pred, gt, [0.8])
    assert tp[0] == 2
    np.testing.assert_allclose(np.sort(dists[0]), [0.76, 0.8])
    f1, rmse = f1_rmse(pred, gt, 0.8)
    assert f1 == 1.0 and rmse == pytest.approx(np.sqrt((0.76**2 + 0.8**2) / 2))


# --- physical gates -----------------------------------------------------------------------


def test_gates_are_nanometres_whatever_the_pixel_size():
    assert [nm_to_px(g, 0.07) for g in GATES_NM] == [1.0, 2.0, 3.0]
    assert [nm_to_px(g, 0.1) for g in GATES_NM] == [0.7, 1.4, 2.1]
    np.testing.assert_allclose(f1_cutoffs_um(gates_for(2)), np.linspace(0, 0.21, 50))
    # A detector's table and the truth in pixels (GT's coordinates), 1.5 px apart in x.
    truth_px = pd.DataFrame({"frame": GT.frame, "x": GT.pos_um[:, 0], "y": GT.pos_um[:, 1]})
    table = truth_px.assign(x=truth_px.x + 1.5, score=1.0)
    # 1.5 px of 0.1 um = 150 nm: inside 210 nm, outside 140 nm.
    geom = Geometry(0.1)
    m = score_table(table, geom.points(truth_px, 3), geom)
    assert m["auc"] == {"70": 0.0, "140": 0.0, "210": pytest.approx(1.0)}
    assert m["f1"] == 0.0  # F1's gate is 140 nm
    assert m["rmse_nm"] != m["rmse_nm"]  # no matched pair within 140 nm: NaN
    geom = Geometry(0.07)  # 105 nm off
    m = score_table(table, geom.points(truth_px, 3), geom)
    assert m["auc"] == {"70": 0.0, "140": pytest.approx(1.0), "210": pytest.approx(1.0)}
    assert m["rmse_nm"] == pytest.approx(105.0) and m["rmse_px"] == pytest.approx(1.5)
    geom = Geometry(0.1)
    m = score_table(table, geom.points(truth_px, 3), geom, gates=gates_for(2, (100, 155.5)))
    assert set(m["auc"]) == {"100", "155.5"} and m["auc"]["155.5"] == pytest.approx(1.0)
    # The same points, read as um, are 1.5 um apart: nothing matches at any gate.
    m = evaluate_points(Points(GT.frame, GT.pos_um + [1.5, 0.0], 3), np.ones(4), GT)
    assert m["auc"] == {"70": 0.0, "140": 0.0, "210": 0.0}


@pytest.mark.parametrize("seed", range(4))
def test_pairs_at_every_cut_and_gate_from_one_pass_equal_the_hungarian_at_each(seed):
    # Crowded frames (up to 12 truths and 18 predictions in 3 x 3 um, gates up to 1.5
    # um) so that pairs compete; scores with ties; predictions in frames beyond the
    # truth's. Against SciPy's Hungarian (``match``) run on each cut's predictions alone
    # and at each gate, and ``best_f1_threshold`` against F1 computed cut by cut.
    rng = np.random.default_rng(seed)
    for _ in range(25):
        nd, nf = int(rng.choice([2, 3])), int(rng.integers(1, 12))
        gt = Points(rng.integers(0, nf, 12 * nf), rng.uniform(0, 3, (12 * nf, nd)), nf)
        npred = int(rng.integers(0, 18 * nf))
        pred = Points(rng.integers(0, nf + 2, npred), rng.uniform(0, 3, (npred, nd)), nf)
        score = rng.integers(0, 6, npred) / 5.0 if rng.random() < 0.5 else rng.uniform(0, 1, npred)
        gate = float(rng.uniform(0.1, 1.5))
        cuts = np.unique(np.r_[score, 2.0])
        want = [match_counts(pred.select(score >= c), gt, [gate])[0][0] for c in cuts]
        np.testing.assert_array_equal(max_pairs_by_cut(pred, score, gt, gate, cuts), want)
        gates = np.r_[0.0, np.sort(rng.uniform(0, 1.5, 8))]
        np.testing.assert_array_equal(max_pairs_by_gate(pred, gt, gates), match_counts(pred, gt, gates)[0])
        if npred:
            cands = np.unique(np.quantile(score, np.linspace(0, 0.995, 200)))
            f1 = [f1_rmse(pred.select(score >= c), gt, gate)[0] for c in cands]
            assert best_f1_threshold(pred, score, gt, gate) == cands[int(np.argmax(f1))]


def test_the_one_pass_counts_refuse_2d_points_against_3d_ones():
    flat, deep = Points([0, 0], [[0, 0], [1, 1]], 1), Points([0, 0], [[0, 0, 0], [1, 1, 5]], 1)
    for pred, gt in ((flat, deep), (deep, flat)):
        with pytest.raises(ValueError, match="coordinates"):
            max_pairs_by_gate(pred, gt, [0.5])
        with pytest.raises(ValueError, match="coordinates"):
            best_f1_threshold(pred, np.ones(2), gt, 0.5)
    assert max_pairs_by_gate(Points([], np.zeros((0, 2)), 1), deep, [0.5]).tolist() == [0]  # nothing to pair


def test_best_f1_threshold_drops_the_low_scored_false_positives():
    # Four true detections scored 0.6 - 0.9 and three far-off ones scored 0.1 - 0.3.
    pred = Points(np.r_[GT.frame, [0, 1, 2]], np.r_[GT.pos_um, [[20, 20], [0, 0], [9, 9]]], 3)
    score = np.r_[[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3]]
    cut = best_f1_threshold(pred, score, GT, 1.0)
    assert 0.3 < cut <= 0.6
