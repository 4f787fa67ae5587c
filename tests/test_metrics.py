"""Metrics: hand-computed cases and the properties any ranking metric must have."""

import numpy as np
import pytest

from models.evaluation.metrics import (GATES_NM, Points, best_f1_threshold, evaluate_points, f1_cutoffs_px, f1_integral,
                            f1_rmse, match_counts, nm_to_px, pr_auc, pr_curve)

CUT = np.linspace(0, 3, 50)  # deepBlink's cutoffs at 0.07 um per pixel


def pts(rows, n_frames):
    rows = np.asarray(rows, float).reshape(-1, 3)
    return Points.from_arrays(rows[:, 0], rows[:, 1], rows[:, 2], n_frames)


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
    pred = Points(GT.frame, GT.xy + [0.5, 0.0], 3)
    f1 = (CUT >= 0.5).astype(float)
    assert f1_integral(pred, GT, CUT) == pytest.approx(np.trapezoid(f1, CUT) / 3)
    f1v, rmse = f1_rmse(pred, GT, 2.0)
    assert f1v == 1.0 and rmse == pytest.approx(0.5)


def test_predictions_beyond_the_gate_score_zero():
    pred = Points(GT.frame, GT.xy + 2.5, 3)
    score = np.ones(4)
    for gate in (1.0, 2.0, 3.0):
        assert pr_auc(pred, score, GT, gate) == (0.0 if gate < 2.5 * np.sqrt(2) else pytest.approx(1.0))
    assert f1_rmse(pred, GT, 2.0)[0] == 0.0


def test_order_of_images_and_predictions_does_not_matter():
    rng = np.random.default_rng(3)
    n = 200
    gt = Points.from_arrays(np.arange(n), rng.uniform(0, 20, n), rng.uniform(0, 20, n), n)
    m = 600
    frame = rng.integers(0, n, m)
    pred = Points.from_arrays(frame, gt.xy[frame, 0] + rng.normal(0, 1.2, m), gt.xy[frame, 1] + rng.normal(0, 1.2, m), n)
    score = rng.integers(0, 20, m).astype(float)  # many ties
    base = [pr_auc(pred, score, gt, g) for g in (1, 2, 3)]
    perm = rng.permutation(m)
    shuffled = Points(pred.frame[perm], pred.xy[perm], n)
    assert [pr_auc(shuffled, score[perm], gt, g) for g in (1, 2, 3)] == base
    # Renumber the images.
    relabel = rng.permutation(n)
    gt2 = Points(relabel[gt.frame], gt.xy, n)
    pred2 = Points(relabel[pred.frame], pred.xy, n)
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


def test_gates_are_nanometres_converted_per_pixel_size():
    assert [nm_to_px(g, 0.07) for g in GATES_NM] == [1.0, 2.0, 3.0]
    assert [nm_to_px(g, 0.1) for g in GATES_NM] == [0.7, 1.4, 2.1]
    np.testing.assert_array_equal(f1_cutoffs_px(0.07), np.linspace(0, 3, 50))
    # 1.5 px of 0.1 um = 150 nm: inside 210 nm, outside 140 nm, whatever the pixel size.
    pred = Points(GT.frame, GT.xy + [1.5, 0.0], 3)
    m = evaluate_points(pred, np.ones(4), GT, pixel_size_um=0.1)
    assert m["auc"] == {"70": 0.0, "140": 0.0, "210": pytest.approx(1.0)}
    assert m["f1"] == 0.0  # F1's gate is 140 nm
    assert m["rmse_nm"] != m["rmse_nm"]  # no matched pair within 140 nm: NaN
    m = evaluate_points(pred, np.ones(4), GT, pixel_size_um=0.07)  # 105 nm off
    assert m["auc"] == {"70": 0.0, "140": pytest.approx(1.0), "210": pytest.approx(1.0)}
    assert m["rmse_nm"] == pytest.approx(105.0) and m["rmse_px"] == pytest.approx(1.5)
    m = evaluate_points(pred, np.ones(4), GT, pixel_size_um=0.1, gates_nm=(100, 155.5))
    assert set(m["auc"]) == {"100", "155.5"} and m["auc"]["155.5"] == pytest.approx(1.0)


def test_best_f1_threshold_drops_the_low_scored_false_positives():
    # Four true detections scored 0.6 - 0.9 and three far-off ones scored 0.1 - 0.3.
    frame = np.r_[GT.frame, [0, 1, 2]]
    xy = np.r_[GT.xy, [[20, 20], [0, 0], [9, 9]]]
    score = np.r_[[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3]]
    cut = best_f1_threshold(frame, xy, score, GT, gate_px=1.0)
    assert 0.3 < cut <= 0.6
