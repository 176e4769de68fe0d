"""Scores for Task A and Task B, with balanced metrics so that a trivial "all AI" model cannot look good."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from aigid.core.config import flatten

# An evaluate report's DVC metrics, per model; everything else (per class, captions, robustness) stays in the
# report.
HEADLINE = (
    "task_a.f1_weighted",
    "task_a.balanced_accuracy",
    "task_b.f1_weighted",
    "task_b.f1_macro",
    "roc_auc",
    "operating_point.threshold",
    "operating_point.test_tpr",
    "calibration.ece",
    "verdict.test_coverage",
)
MODELS = ("base", "retrained")


def task_scores(y_true, y_pred, labels) -> dict[str, float]:
    """Weighted F1/precision/recall, accuracy, balanced accuracy and macro F1 over ``labels``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    return {
        "f1_weighted": float(f),
        "precision_weighted": float(p),
        "recall_weighted": float(r),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }


def score(labels_a, labels_b, pred_a, pred_b, class_names: tuple[str, ...]) -> dict:
    """Both tasks, plus per-class results for Task B (detection rate of each generator, F1 of attribution).

    Task A also has ``f1_binary``, the F1 of the AI class alone: the reference code's selection metric, for
    comparison with CT2 results reported that way.
    """
    labels_b, pred_b, pred_a = np.asarray(labels_b), np.asarray(pred_b), np.asarray(pred_a)
    out = {
        "task_a": task_scores(labels_a, pred_a, [0, 1]),
        "task_b": task_scores(labels_b, pred_b, list(range(len(class_names)))),
    }
    out["task_a"]["f1_binary"] = float(f1_score(labels_a, pred_a, pos_label=1, average="binary", zero_division=0))
    f1_b = f1_score(labels_b, pred_b, labels=list(range(len(class_names))), average=None, zero_division=0)
    per_class = {}
    for k, name in enumerate(class_names):
        rows = labels_b == k
        if not rows.any():
            continue
        # For class 0 "called real" is the correct Task A answer; for a generator, "called AI" is.
        correct_a = (pred_a[rows] == (0 if k == 0 else 1)).mean()
        per_class[name] = {
            "n": int(rows.sum()),
            "task_a_recall": float(correct_a),
            "task_b_f1": float(f1_b[k]),
            "task_b_recall": float((pred_b[rows] == k).mean()),
        }
    out["per_class"] = per_class
    return out


def confusion_rows(y_true, y_pred, names) -> list[dict[str, str]]:
    """Rows for DVC's ``confusion`` plot template: one {actual, predicted} pair per sample."""
    return [{"actual": names[t], "predicted": names[p]} for t, p in zip(np.asarray(y_true), np.asarray(y_pred))]


def ranking_scores(labels_a, prob_ai) -> dict[str, float]:
    """Threshold-free Task A quality: ROC AUC and average precision (AI is the positive class)."""
    labels_a, prob_ai = np.asarray(labels_a), np.asarray(prob_ai)
    if len(np.unique(labels_a)) < 2:
        raise ValueError("ROC AUC and average precision need both real and AI images")
    return {
        "roc_auc": float(roc_auc_score(labels_a, prob_ai)),
        "average_precision": float(average_precision_score(labels_a, prob_ai)),
    }


def curve_rows(labels_a, prob_ai) -> dict[str, list[dict[str, float]]]:
    """Rows for the ROC ({fpr, tpr}) and precision-recall ({recall, precision}) DVC plots."""
    fpr, tpr, _ = roc_curve(labels_a, prob_ai)
    precision, recall, _ = precision_recall_curve(labels_a, prob_ai)
    return {
        "roc": [{"fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr)],
        "pr": [{"recall": float(r), "precision": float(p)} for r, p in zip(recall, precision)],
    }


CALIBRATION_BINS = 15


def calibration(labels_a, prob_ai, bins: int = CALIBRATION_BINS) -> tuple[dict, list[dict]]:
    """Calibration of P(AI): the expected calibration error and the rows of a reliability plot.

    P(AI) is cut into ``bins`` equal-width bins on [0, 1], a value on an edge going to the lower bin (the bins of
    scikit-learn's ``calibration_curve(strategy="uniform")``, whose points are the plot's). ECE = sum over bins
    of (images in the bin / all images) * |mean P(AI) in the bin - share of AI images in the bin|; 0 is perfectly
    calibrated. Empty bins have no row.
    """
    labels_a, prob_ai = np.asarray(labels_a, dtype=float), np.asarray(prob_ai, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], prob_ai)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        mean_p, share_ai = float(prob_ai[inside].mean()), float(labels_a[inside].mean())
        ece += inside.mean() * abs(mean_p - share_ai)
        rows.append({"bin": b, "mean_prob_ai": mean_p, "fraction_ai": share_ai, "count": int(inside.sum())})
    return {"ece": float(ece), "bins": bins, "binning": "equal-width on [0, 1]"}, rows


def verdict_scores(labels_a, verdict) -> dict[str, float | None]:
    """A three-way verdict (real, unsure, ai) against the truth: the share of rows decided (coverage), the
    share of decided rows that are right (None when none is), the share of real images called AI (fpr_verdict)
    and of AI images called real (fnr_verdict)."""
    labels_a, verdict = np.asarray(labels_a), np.asarray(verdict)
    decided = verdict != "unsure"
    right = (verdict == "ai") == (labels_a == 1)
    return {
        "coverage": float(decided.mean()),
        "accuracy_decided": float(right[decided].mean()) if decided.any() else None,
        "fpr_verdict": float((verdict[labels_a == 0] == "ai").mean()),
        "fnr_verdict": float((verdict[labels_a == 1] == "real").mean()),
    }


def rates_at(labels_a, prob_ai, threshold: float) -> dict[str, float]:
    """Task A true- and false-positive rates when P(AI) >= ``threshold`` is called AI."""
    labels_a, called = np.asarray(labels_a), np.asarray(prob_ai) >= threshold
    return {"tpr": float(called[labels_a == 1].mean()), "fpr": float(called[labels_a == 0].mean())}


def headline(report: dict) -> dict:
    """The few numbers of an evaluate report compared across experiments (``dvc exp show``), nested per model
    as in the report, and retrained against base (:func:`paired_bootstrap`: each metric's difference and its
    interval)."""
    out: dict = {"contaminated": report["contaminated"]}
    for model in MODELS:
        flat = flatten(report[model])
        out[model] = {}
        for key in HEADLINE:
            group, _, name = key.rpartition(".")
            (out[model].setdefault(group, {}) if group else out[model])[name] = flat[key]
    if COMPARISON in report:
        out[COMPARISON] = {
            metric: {k: v[k] for k in ("difference", "ci_low", "ci_high")}
            for metric, v in report[COMPARISON]["metrics"].items()
        }
    return out


COMPARISON = "retrained_vs_base"  # the key of :func:`paired_bootstrap`'s result in the evaluate report
BOOTSTRAP_ROUNDS, BOOTSTRAP_SEED, CONFIDENCE = 1000, 0, 0.95


def weighted_f1(y_true, y_pred, n_classes: int, weights=None) -> float:
    """F1 per class over classes 0..n_classes-1 averaged by their support (scikit-learn's ``average="weighted"``
    with ``zero_division=0``), each row counted ``weights`` times (a bootstrap resample's counts)."""
    cm = np.bincount(
        np.asarray(y_true) * n_classes + np.asarray(y_pred), weights=weights, minlength=n_classes * n_classes
    ).reshape(n_classes, n_classes)
    support, predicted, right = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    f1 = np.divide(2 * right, support + predicted, out=np.zeros(n_classes), where=support + predicted > 0)
    return float((f1 * support).sum() / support.sum())


def paired_bootstrap(
    labels_a, labels_b, base, retrained, n_classes: int, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED
) -> dict:
    """Retrained against base on the same test rows: Task A ROC AUC and both tasks' weighted F1 of each, the
    difference (retrained - base) and its percentile interval at :data:`CONFIDENCE` over ``rounds`` resamples of
    the rows (the same rows for both models: a paired bootstrap, seeded). ``base`` and ``retrained`` are each
    model's (P(AI), Task A labels, Task B labels) on the rows. An interval below 0 says retraining hurt; one
    across 0, that this test split cannot tell. Resamples holding one Task A class only have no ROC AUC and
    are left out of its interval (``rounds_used``)."""
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    n = len(labels_a)

    def metrics(model, weights=None) -> dict[str, float]:
        prob_ai, pred_a, pred_b = (np.asarray(v) for v in model)
        one_class = weights is not None and min(weights[labels_a == 0].sum(), weights[labels_a == 1].sum()) == 0
        return {
            "task_a_roc_auc": np.nan if one_class else float(roc_auc_score(labels_a, prob_ai, sample_weight=weights)),
            "task_a_f1_weighted": weighted_f1(labels_a, pred_a, 2, weights),
            "task_b_f1_weighted": weighted_f1(labels_b, pred_b, n_classes, weights),
        }

    rng = np.random.default_rng(seed)
    differences: dict[str, list[float]] = {}
    for _ in range(rounds):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        b, r = metrics(base, weights), metrics(retrained, weights)
        for key in b:
            differences.setdefault(key, []).append(r[key] - b[key])
    point_b, point_r = metrics(base), metrics(retrained)
    tail = 100 * (1 - CONFIDENCE) / 2
    out = {}
    for key, values in differences.items():
        values = np.asarray(values)
        values = values[~np.isnan(values)]
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (None, None)
        out[key] = {
            "base": point_b[key],
            "retrained": point_r[key],
            "difference": point_r[key] - point_b[key],
            "ci_low": None if low is None else float(low),
            "ci_high": None if high is None else float(high),
            "rounds_used": int(len(values)),
        }
    return {
        "method": "paired bootstrap over the test rows (percentile interval)",
        "rounds": rounds,
        "seed": seed,
        "confidence": CONFIDENCE,
        "metrics": out,
    }
