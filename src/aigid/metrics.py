"""Scores for Task A and Task B, with balanced metrics so that a trivial "all AI" model cannot look good."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
)

from .model import CLASS_NAMES


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


def score(labels_a, labels_b, pred_a, pred_b, class_names=CLASS_NAMES) -> dict:
    """Both tasks, plus per-class results for Task B (detection rate of each generator, F1 of attribution)."""
    labels_b, pred_b, pred_a = np.asarray(labels_b), np.asarray(pred_b), np.asarray(pred_a)
    out = {"task_a": task_scores(labels_a, pred_a, [0, 1]),
           "task_b": task_scores(labels_b, pred_b, list(range(len(class_names))))}
    f1_b = f1_score(labels_b, pred_b, labels=list(range(len(class_names))), average=None, zero_division=0)
    per_class = {}
    for k, name in enumerate(class_names):
        rows = labels_b == k
        if not rows.any():
            continue
        # For class 0 "called real" is the correct Task A answer; for a generator, "called AI" is.
        correct_a = (pred_a[rows] == (0 if k == 0 else 1)).mean()
        per_class[name] = {"n": int(rows.sum()), "task_a_recall": float(correct_a), "task_b_f1": float(f1_b[k]),
                           "task_b_recall": float((pred_b[rows] == k).mean())}
    out["per_class"] = per_class
    return out


def confusion_rows(y_true, y_pred, names) -> list[dict[str, str]]:
    """Rows for DVC's ``confusion`` plot template: one {actual, predicted} pair per sample."""
    return [{"actual": names[t], "predicted": names[p]} for t, p in zip(np.asarray(y_true), np.asarray(y_pred))]
