"""Metrics: hand-computed cases and the properties any ranking metric must have."""

import numpy as np
import pytest

from models.metrics import Points, f1_integral, f1_rmse, pr_auc, pr_curve


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
    assert f1_integral(GT, GT) == pytest.approx(1.0)  # matched at every cutoff, even 0
    f1, rmse = f1_rmse(GT, GT)
    assert f1 == 1.0 and rmse == 0.0


def test_f1_integral_by_hand():
    # Every prediction 0.5 px off: F1 = 0 below the 0.5 cutoff, 1 from it on.
    pred = Points(GT.frame, GT.xy + [0.5, 0.0], 3)
    cut = np.linspace(0, 3, 50)
    f1 = (cut >= 0.5).astype(float)
    assert f1_integral(pred, GT) == pytest.approx(np.trapezoid(f1, cut) / 3)
    f1v, rmse = f1_rmse(pred, GT)
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
    assert f1_integral(shuffled, gt) == pytest.approx(f1_integral(pred, gt))


def test_a_duplicate_of_a_true_positive_is_a_false_positive():
    gt = pts([[0, 5, 5]], 1)
    pred = pts([[0, 5, 5], [0, 5.1, 5]], 1)
    p, r = pr_curve(pred, np.array([2.0, 1.0]), gt, 1.0)
    np.testing.assert_allclose(p, [1.0, 0.5])
    np.testing.assert_allclose(r, [1.0, 1.0])
    f1, _ = f1_rmse(pred, gt)
    assert f1 == pytest.approx(2 * 1 / 3)


def test_greedy_takes_nearest_free_truth_and_hungarian_maximises_matches():
    gt = pts([[0, 0, 0], [0, 1.5, 0]], 1)
    # The top prediction sits between both; the second can only reach the first truth.
    pred = pts([[0, 0.8, 0], [0, -0.5, 0]], 1)
    p, r = pr_curve(pred, np.array([2.0, 1.0]), gt, 1.0)
    # Greedy: the top takes the nearer truth (1.5 is 0.7 away, 0 is 0.8 away) -> both TP.
    np.testing.assert_allclose(p, [1.0, 1.0])
    # Hungarian with a 0.8 cutoff also finds two pairs.
    f1, rmse = f1_rmse(pred, gt, 0.8)
    assert f1 == 1.0 and rmse == pytest.approx(np.sqrt((0.7**2 + 0.5**2) / 2))
