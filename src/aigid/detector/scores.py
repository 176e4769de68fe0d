"""The decision rule on the heads' logits, in numpy: one home for the stages (train's validation, pseudolabel,
evaluate, export's check), `aigid detect` and the registered model, on the torch detector and on the portable one
(:mod:`aigid.serving.portable`, which runs without torch) alike.

P(AI) is the sigmoid of head A and the image is called AI at ``P(AI) >= threshold``. Head B is trained only on
AI images, so its class-0 logit is never a target: its softmax is taken over the AI classes only, and the
predicted class is 0 (real) exactly when the image is called real, else the most probable AI class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


def output_columns(class_names) -> list[str]:
    """The columns of a scored row (:func:`score_rows`, the registered model, `aigid detect` after its
    ``path``), the same whatever happened to the input: ``error`` is empty when the image was scored."""
    return ["error", "prob_ai", "label", "generator", "threshold", "caption", *(f"p_{name}" for name in class_names)]


class Decision(NamedTuple):
    """Per-row outputs of :func:`decide`, float32 or int64 numpy arrays."""

    prob_ai: np.ndarray  # P(AI), the sigmoid of head A
    label_a: np.ndarray  # 1 where prob_ai >= threshold, else 0
    probs_b: np.ndarray  # head B's softmax over the AI classes (class 0's column is 0)
    label_b: np.ndarray  # 0 where label_a is 0, else the most probable AI class
    conf_a: np.ndarray  # max(prob_ai, 1 - prob_ai)
    conf_b: np.ndarray  # max of probs_b where label_a is 1; conf_a where it is 0


def decide(logits_a: np.ndarray, logits_b: np.ndarray, threshold: float = 0.5) -> Decision:
    """The rule applied to logits of shape (rows,) and (rows, classes).

    The probabilities are computed in float64 and rounded to float32: numpy's float32 exp is vectorised
    differently on different CPUs, whereas any float64 exp rounds to the same float32 value, so every machine
    gets the same probabilities, labels and metrics (see docs/reproducibility.md)."""
    logits_a = np.asarray(logits_a, dtype=np.float64)
    prob_ai = np.exp(-np.logaddexp(0.0, -logits_a)).astype(np.float32)  # the sigmoid, without overflow
    label_a = (prob_ai >= threshold).astype(np.int64)
    ai = np.asarray(logits_b, dtype=np.float64)[:, 1:]
    exp = np.exp(ai - ai.max(axis=1, keepdims=True))
    probs_b = np.concatenate([np.zeros((len(ai), 1)), exp / exp.sum(axis=1, keepdims=True)], axis=1).astype(np.float32)
    label_b = np.where(label_a == 1, probs_b[:, 1:].argmax(axis=1) + 1, 0)
    conf_a = np.maximum(prob_ai, 1 - prob_ai)
    conf_b = np.where(label_a == 1, probs_b.max(axis=1), conf_a)
    return Decision(prob_ai, label_a, probs_b, label_b, conf_a, conf_b)


def score_rows(
    logits_a: np.ndarray, logits_b: np.ndarray, class_names: Sequence[str], threshold: float, captions: Sequence[str]
) -> list[dict]:
    """One row of scores per image (the columns of :func:`output_columns` but ``error``).

    Class probabilities are joint: P(real) = 1 - P(AI) and P(generator) = P(AI) * P(generator | AI).
    """
    prob_ai, label_a, probs_b, label_b, _, _ = decide(logits_a, logits_b, threshold)
    rows = []
    for i, caption in enumerate(captions):
        p_ai = float(prob_ai[i])
        row = {
            "prob_ai": p_ai,
            "label": "ai" if label_a[i] else "real",
            "generator": class_names[int(label_b[i])],
            "threshold": threshold,
            "caption": caption,
        }
        row.update({f"p_{n}": (1 - p_ai) if k == 0 else p_ai * float(probs_b[i, k]) for k, n in enumerate(class_names)})
        rows.append(row)
    return rows
