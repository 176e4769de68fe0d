"""The `pseudolabel` stage (aigid.stages.pseudolabel): which confident samples it keeps, by threshold or class
balanced, and how often the labels it keeps are estimated to be right."""

import json
import logging

import numpy as np
import pytest
import yaml

from aigid.detector.scores import decide
from aigid.stages.pseudolabel import estimate_precision, select_confident, warn_if_imprecise, wilson
from helpers import aigid, finish


def test_selection_keeps_only_samples_strictly_above_the_threshold_on_both_tasks():
    conf_a = np.array([0.80, 0.81, 0.95, 0.99, 0.7999])
    conf_b = np.array([0.99, 0.81, 0.80, 0.90, 0.99])
    assert select_confident(conf_a, conf_b, 0.8).tolist() == [1, 3]
    assert select_confident(conf_a, conf_b, 0.79).tolist() == [0, 1, 2, 3, 4]
    assert select_confident(conf_a, conf_b, 0.99).tolist() == []


def test_class_quotas_keep_the_mix_and_never_exceed_what_is_available():
    from aigid.stages.pseudolabel import class_quotas

    mix = np.array([1, 1, 1, 1, 1, 1]) / 6  # CT2's train split: one image per source
    assert class_quotas(np.array([65, 97, 102, 37, 63, 78]), mix).tolist() == [37] * 6
    assert class_quotas(np.array([10, 100, 100]), np.array([0.5, 0.25, 0.25])).tolist() == [10, 5, 5]
    assert class_quotas(np.array([0, 50, 50]), np.array([0.2, 0.4, 0.4])).tolist() == [0, 0, 0]  # no real: none
    assert class_quotas(np.array([7, 50, 0]), np.array([0.5, 0.5, 0.0])).tolist() == [7, 7, 0]  # no share: none


def test_class_balanced_selection_keeps_the_most_confident_of_each_predicted_class():
    from aigid.stages.pseudolabel import select_class_balanced

    conf_a = np.array([0.99, 0.95, 0.90, 0.85, 0.97, 0.70, 0.99, 0.91])
    conf_b = np.array([0.99, 0.95, 0.90, 0.85, 0.93, 0.99, 0.81, 0.99])
    label_b = np.array([1, 1, 1, 1, 0, 0, 1, 0])
    # Above 0.8: class 1 has rows 0, 1, 2, 3, 6; class 0 has rows 4, 7 (row 5 fails on Task A).
    keep, quotas = select_class_balanced(conf_a, conf_b, label_b, 0.8, np.array([0.5, 0.5]))
    assert quotas.tolist() == [2, 2]
    assert keep.tolist() == [0, 1, 4, 7]  # class 1: rows 0 (0.99) and 1 (0.95)
    keep, quotas = select_class_balanced(conf_a, conf_b, label_b, 0.8, np.array([0.2, 0.8]))
    assert quotas.tolist() == [1, 5] and keep.tolist() == [0, 1, 2, 3, 4, 6]  # row 4 (0.93) beats row 7 (0.91)


@pytest.mark.slow
def test_class_balanced_pseudo_labels_have_the_train_mix(frozen, tmp_path):
    params = yaml.safe_load((frozen / "params.yaml").read_text())
    params["pseudolabel"]["selection"] = "class_balanced"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    finish(
        aigid(
            "pseudolabel",
            "--model",
            str(frozen / "models/base"),
            "--data",
            str(frozen / "data/prepared"),
            "--features",
            str(frozen / "data/features"),
            "--out",
            str(tmp_path / "pseudo"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--report",
            str(tmp_path / "r.json"),
            cwd=tmp_path,
        )
    )
    report = json.loads((tmp_path / "r.json").read_text())
    default = json.loads((frozen / "reports/pseudolabel.json").read_text())
    assert report["selection"] == "class_balanced" and default["selection"] == "threshold"
    assert report["passed_threshold"] == default["kept"] >= report["kept"]
    per_class = report["per_class"].values()
    assert [c["kept"] for c in per_class] == [c["quota"] for c in per_class]
    assert len({c["quota"] for c in per_class}) == 1  # the tiny train split has one image per source
    assert min(c["passed_threshold"] for c in per_class) == next(iter(per_class))["quota"]
    assert report["kept"] == report["train_rows"] + report["validation_rows"] == sum(c["kept"] for c in per_class)
    # The same rule on the labelled validation split estimates the kept labels' precision: metrics and report.
    metrics, estimate = json.loads((tmp_path / "m.json").read_text()), report["estimate"]
    assert estimate["split"] == "validation" and estimate["rows"] == 36 >= estimate["kept"]
    assert metrics["estimated_kept"] == estimate["kept"]
    assert metrics["estimated_precision_a"] == estimate["task_a"]["precision"]
    assert metrics["estimated_precision_b"] == estimate["task_b"]["precision"]


def _validation():
    """Ten labelled rows the rule keeps eight of: Task A right on 6 of them, Task B on 5."""
    from datasets import Dataset

    # Kept (confident) rows 0-7; rows 8-9 sit at P(AI) 0.5 and are never kept.
    logits_a = np.array([4.0, 4.0, 4.0, 4.0, 4.0, -4.0, -4.0, -4.0, 0.0, 0.0])
    logits_b = np.zeros((10, 3))
    logits_b[:, 1] = 5.0  # AI rows predicted class 1
    pred = decide(logits_a, logits_b)
    # Predicted A: 1 1 1 1 1 0 0 0; true A makes rows 3, 4 (called AI) wrong: 6 of 8 right.
    # Predicted B: 1 1 1 1 1 0 0 0; true B also makes row 2 wrong (class 2): 5 of 8 right.
    labels_a = [1, 1, 1, 0, 0, 0, 0, 0, 1, 0]
    labels_b = [1, 1, 2, 0, 0, 0, 0, 0, 1, 0]
    return Dataset.from_dict({"Label_A": labels_a, "Label_B": labels_b}), pred


def test_the_keep_rule_on_validation_estimates_the_kept_labels_precision_with_a_wilson_interval():
    validation, pred = _validation()
    keep = select_confident(pred.conf_a, pred.conf_b, 0.8)
    assert keep.tolist() == list(range(8))
    estimate = estimate_precision(validation, pred, keep)
    assert estimate["rows"] == 10 and estimate["kept"] == 8 and estimate["interval"] == "wilson"
    a, b = estimate["task_a"], estimate["task_b"]
    assert (a["correct"], a["precision"], b["correct"], b["precision"]) == (6, 0.75, 5, 0.625)
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((0.4093, 0.9285), abs=1e-4)  # Wilson, 95%, 6 of 8
    assert wilson(0, 0) == (None, None) and wilson(10, 10)[1] == pytest.approx(1.0)
    none = estimate_precision(validation, pred, keep[:0])
    assert none["kept"] == 0 and none["task_a"]["precision"] is None and none["task_a"]["ci_low"] is None


def test_a_precision_below_the_floor_is_one_warning_line_and_never_an_error(caplog):
    validation, pred = _validation()
    estimate = estimate_precision(validation, pred, np.arange(8))
    with caplog.at_level(logging.WARNING, logger="aigid.stages.pseudolabel"):
        warn_if_imprecise(estimate, 0.0)  # the default: never warns
        warn_if_imprecise(estimate, 0.6)  # both tasks above it (0.75, 0.625)
        assert not caplog.records
        warn_if_imprecise(estimate, 0.7)  # Task B below it, Task A not
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "pseudolabel.min_precision=0.7" in message
    assert "Task B 0.625 (5/8, 95% CI 0.306-0.863)" in message and "Task A" not in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aigid.stages.pseudolabel"):
        warn_if_imprecise(estimate_precision(validation, pred, np.arange(0)), 0.5)
    assert ["keeps none of the 10 validation rows" in r.getMessage() for r in caplog.records] == [True]
