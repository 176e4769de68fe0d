import numpy as np
import pytest

from aigid.metrics import score, task_scores
from aigid.pseudolabel import select_confident


def test_task_scores_match_hand_computed_values():
    # 4 real, 6 AI; real: 3 right 1 wrong; AI: 5 right 1 wrong.
    y_true = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    y_pred = [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    s = task_scores(y_true, y_pred, [0, 1])
    f1_real = 2 * (3 / 4) * (3 / 4) / (3 / 4 + 3 / 4)          # precision 3/4, recall 3/4
    f1_ai = 2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6)            # precision 5/6, recall 5/6
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
    assert "sd3" not in s["per_class"]          # no such images: no made-up row


def test_selection_keeps_only_samples_strictly_above_the_threshold_on_both_tasks():
    conf_a = np.array([0.80, 0.81, 0.95, 0.99, 0.7999])
    conf_b = np.array([0.99, 0.81, 0.80, 0.90, 0.99])
    assert select_confident(conf_a, conf_b, 0.8).tolist() == [1, 3]
    assert select_confident(conf_a, conf_b, 0.79).tolist() == [0, 1, 2, 3, 4]
    assert select_confident(conf_a, conf_b, 0.99).tolist() == []
