"""The rows a scored image gets (`aigid detect`, the registered model): the decision rule on the heads' logits
as numpy, so that the portable detector (:mod:`aigid.serving.portable`), which runs without torch, scores exactly as
the torch one.

The rule is :func:`aigid.detector.model.decide`'s (the stages' torch version; tests/test_portable.py compares them):
P(AI) is the sigmoid of head A, the image is called AI at ``P(AI) >= threshold``, head B's softmax is taken
over the AI classes only, and the generator is real exactly when the image is called real.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def output_columns(class_names) -> list[str]:
    """The columns of a scored row (:func:`score_rows`, the registered model, `aigid detect` after its
    ``path``), the same whatever happened to the input: ``error`` is empty when the image was scored."""
    return ["error", "prob_ai", "label", "generator", "threshold", "caption", *(f"p_{name}" for name in class_names)]


def decide(logits_a: np.ndarray, logits_b: np.ndarray, threshold: float = 0.5):
    """P(AI), the AI decision, head B's probabilities over the AI classes (class 0's column is 0) and the
    predicted class (0, real, exactly when the image is not called AI), all in float32 like the torch rule."""
    logits_a = np.asarray(logits_a, dtype=np.float32)
    prob_ai = np.exp(-np.logaddexp(np.float32(0), -logits_a))  # the sigmoid, without overflow
    label_a = prob_ai >= threshold
    ai = np.asarray(logits_b, dtype=np.float32)[:, 1:]
    exp = np.exp(ai - ai.max(axis=1, keepdims=True))
    probs_b = np.concatenate([np.zeros((len(ai), 1), np.float32), exp / exp.sum(axis=1, keepdims=True)], axis=1)
    label_b = np.where(label_a, probs_b[:, 1:].argmax(axis=1) + 1, 0)
    return prob_ai, label_a, probs_b, label_b


def score_rows(
    logits_a: np.ndarray, logits_b: np.ndarray, class_names: Sequence[str], threshold: float, captions: Sequence[str]
) -> list[dict]:
    """One row of scores per image (the columns of :func:`output_columns` but ``error``).

    Class probabilities are joint: P(real) = 1 - P(AI) and P(generator) = P(AI) * P(generator | AI).
    """
    prob_ai, label_a, probs_b, label_b = decide(logits_a, logits_b, threshold)
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
