"""Scores for Task A and Task B (aigid.tracking.metrics): balanced ones, per class, ranking, calibration and the
three-way verdict."""

import numpy as np
import pytest

from aigid.tracking.metrics import ranking_scores, rates_at, score, task_scores, verdict_scores


def test_task_scores_match_hand_computed_values():
    # 4 real, 6 AI; real: 3 right 1 wrong; AI: 5 right 1 wrong.
    y_true = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    y_pred = [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    s = task_scores(y_true, y_pred, [0, 1])
    f1_real = 2 * (3 / 4) * (3 / 4) / (3 / 4 + 3 / 4)  # precision 3/4, recall 3/4
    f1_ai = 2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6)  # precision 5/6, recall 5/6
    assert s["f1_weighted"] == pytest.approx(0.4 * f1_real + 0.6 * f1_ai)
    assert s["f1_macro"] == pytest.approx((f1_real + f1_ai) / 2)
    assert s["accuracy"] == pytest.approx(0.8)
    assert s["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)


def test_all_ai_model_does_not_look_good_on_balanced_metrics():
    y_true = [0] * 10 + [1] * 50
    s = task_scores(y_true, [1] * 60, [0, 1])
    assert s["accuracy"] == pytest.approx(50 / 60)
    assert s["balanced_accuracy"] == pytest.approx(0.5)
    assert s["f1_macro"] == pytest.approx((0 + 2 * 50 / 60 / (1 + 50 / 60)) / 2)


def test_per_class_detection_rates():
    labels_b = np.array([0, 0, 1, 1, 2, 2])
    labels_a = (labels_b > 0).astype(int)
    pred_a = np.array([0, 1, 1, 0, 1, 1])
    pred_b = np.array([0, 3, 1, 0, 3, 2])
    s = score(labels_a, labels_b, pred_a, pred_b, ("real", "sd21", "sdxl", "sd3", "dalle3", "midjourney6"))
    assert s["per_class"]["real"]["task_a_recall"] == pytest.approx(0.5)
    assert s["per_class"]["sd21"]["task_a_recall"] == pytest.approx(0.5)
    assert s["per_class"]["sdxl"]["task_a_recall"] == pytest.approx(1.0)
    assert s["per_class"]["sdxl"]["task_b_recall"] == pytest.approx(0.5)
    assert "sd3" not in s["per_class"]  # no such images: no made-up row


def test_binary_f1_is_the_ai_class_f1():
    # 4 real, 6 AI; AI: precision 5/6, recall 5/6. An all-AI model has a high binary F1 and a low macro one.
    labels_a = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pred_a = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 0])
    s = score(labels_a, labels_a, pred_a, pred_a, ("real", "ai"))
    assert s["task_a"]["f1_binary"] == pytest.approx(5 / 6)
    all_ai = score(labels_a, labels_a, np.ones(10, int), np.ones(10, int), ("real", "ai"))["task_a"]
    assert all_ai["f1_binary"] == pytest.approx(2 * 0.6 / 1.6) and all_ai["f1_macro"] < all_ai["f1_binary"]


def test_calibration_error_by_hand_and_bins_as_scikit_learn_cuts_them():
    from sklearn.calibration import calibration_curve

    from aigid.tracking.metrics import calibration

    # Two occupied bins of 15: [0, 1/15) holds 0.0 and 0.05 (no AI), [14/15, 1] holds 0.95 and 1.0 (one AI).
    labels, prob = np.array([0, 0, 1, 0]), np.array([0.0, 0.05, 0.95, 1.0])
    summary, rows = calibration(labels, prob)
    assert summary["bins"] == 15
    assert [r["count"] for r in rows] == [2, 2] and rows[1]["fraction_ai"] == pytest.approx(0.5)
    assert summary["ece"] == pytest.approx(0.5 * 0.025 + 0.5 * abs(0.975 - 0.5))
    rng = np.random.default_rng(0)
    prob = np.concatenate([rng.random(500), np.arange(16) / 15])  # bin edges included
    labels = (rng.random(len(prob)) < prob).astype(int)
    summary, rows = calibration(labels, prob)
    true, predicted = calibration_curve(labels, prob, n_bins=15, strategy="uniform")
    assert np.allclose([r["fraction_ai"] for r in rows], true)
    assert np.allclose([r["mean_prob_ai"] for r in rows], predicted)
    assert sum(r["count"] for r in rows) == len(prob) and summary["ece"] < 0.1  # drawn calibrated
    assert calibration([1, 1, 0, 0], [1.0, 1.0, 0.0, 0.0])[0]["ece"] == 0.0


def test_rates_and_ranking_scores():
    labels, prob = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.4])
    assert rates_at(labels, prob, 0.5) == {"tpr": 0.5, "fpr": 0.5}
    assert ranking_scores(labels, prob)["roc_auc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both real and AI"):
        ranking_scores([1, 1], [0.2, 0.3])


def test_verdict_scores_count_unsure_rows_as_undecided():
    labels = np.array([0, 0, 0, 1, 1, 1])
    verdict = np.array(["real", "ai", "unsure", "ai", "unsure", "real"])
    assert verdict_scores(labels, verdict) == {
        "coverage": pytest.approx(4 / 6),
        "accuracy_decided": 0.5,  # real->real and ai->ai right; real->ai and ai->real wrong
        "fpr_verdict": pytest.approx(1 / 3),
        "fnr_verdict": pytest.approx(1 / 3),
    }
    assert verdict_scores([0, 1], ["unsure", "unsure"])["accuracy_decided"] is None
