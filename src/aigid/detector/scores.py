"""The decision rule on the heads' logits, in numpy: one home for the stages (train's validation, pseudolabel,
evaluate, export's check), `aigid detect` and the registered model, on the torch detector and on the portable one
(:mod:`aigid.serving.portable`, which runs without torch) alike.

P(AI) is the sigmoid of head A (divided by the model's temperature, when it has one) and the image is called AI at
``P(AI) >= threshold``. Head B is trained only on AI images, so its class-0 logit is never a target: its softmax is
taken over the AI classes only, and the predicted class is 0 (real) exactly when the image is called real, else the
most probable AI class. The verdict adds a band: ``ai`` at or above the threshold, ``real`` below a lower one,
``unsure`` between them.

A trained model carries its own rule in ``scoring.json`` (:class:`Scoring`, fitted by train and retrain on the
labelled validation split): the temperature that calibrates P(AI), the threshold (the operating point) and the
lower threshold of the verdict, and the data it learned from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from aigid.core.errors import DataError

SCORING_FILE = "scoring.json"
VERDICTS = ("real", "unsure", "ai")


def output_columns(class_names) -> list[str]:
    """The columns of a scored row (:func:`score_rows`, the registered model, `aigid detect` after its
    ``path``), the same whatever happened to the input: ``error`` is empty when the image was scored."""
    return [
        "error",
        "verdict",
        "prob_ai",
        "label",
        "generator",
        "threshold",
        "caption",
        *(f"p_{name}" for name in class_names),
    ]


class Decision(NamedTuple):
    """Per-row outputs of :func:`decide`, float32 or int64 numpy arrays."""

    prob_ai: np.ndarray  # P(AI), the sigmoid of head A over the temperature
    label_a: np.ndarray  # 1 where prob_ai >= threshold, else 0
    probs_b: np.ndarray  # head B's softmax over the AI classes (class 0's column is 0)
    label_b: np.ndarray  # 0 where label_a is 0, else the most probable AI class
    conf_a: np.ndarray  # max(prob_ai, 1 - prob_ai)
    conf_b: np.ndarray  # max of probs_b where label_a is 1; conf_a where it is 0
    verdict: np.ndarray  # "ai" where label_a is 1, "real" where prob_ai < lower, else "unsure"


def decide(
    logits_a: np.ndarray,
    logits_b: np.ndarray,
    threshold: float = 0.5,
    lower: float | None = None,
    temperature: float = 1.0,
) -> Decision:
    """The rule applied to logits of shape (rows,) and (rows, classes): P(AI) = sigmoid(logit / temperature),
    called AI at ``threshold``, called real below ``lower`` (the threshold when not given: no unsure band).

    The probabilities are computed in float64 and rounded to float32: numpy's float32 exp is vectorised
    differently on different CPUs, whereas any float64 exp rounds to the same float32 value, so every machine
    gets the same probabilities, labels and metrics (see docs/reproducibility.md)."""
    logits_a = np.asarray(logits_a, dtype=np.float64) / temperature
    prob_ai = np.exp(-np.logaddexp(0.0, -logits_a)).astype(np.float32)  # the sigmoid, without overflow
    label_a = (prob_ai >= threshold).astype(np.int64)
    ai = np.asarray(logits_b, dtype=np.float64)[:, 1:]
    exp = np.exp(ai - ai.max(axis=1, keepdims=True))
    probs_b = np.concatenate([np.zeros((len(ai), 1)), exp / exp.sum(axis=1, keepdims=True)], axis=1).astype(np.float32)
    label_b = np.where(label_a == 1, probs_b[:, 1:].argmax(axis=1) + 1, 0)
    conf_a = np.maximum(prob_ai, 1 - prob_ai)
    conf_b = np.where(label_a == 1, probs_b.max(axis=1), conf_a)
    lower = threshold if lower is None else lower
    verdict = np.where(label_a == 1, "ai", np.where(prob_ai < lower, "real", "unsure"))
    return Decision(prob_ai, label_a, probs_b, label_b, conf_a, conf_b, verdict)


def score_rows(
    logits_a: np.ndarray,
    logits_b: np.ndarray,
    class_names: Sequence[str],
    captions: Sequence[str],
    scoring: Scoring,
    threshold: float | None = None,
) -> list[dict]:
    """One row of scores per image (the columns of :func:`output_columns` but ``error``), by the model's rule
    (``scoring``) or, with ``threshold``, at that one cut (no unsure band).

    Class probabilities are joint: P(real) = 1 - P(AI) and P(generator) = P(AI) * P(generator | AI).
    """
    d = scoring.decide(logits_a, logits_b, threshold)
    cut = scoring.threshold if threshold is None else threshold
    rows = []
    for i, caption in enumerate(captions):
        p_ai = float(d.prob_ai[i])
        row = {
            "verdict": str(d.verdict[i]),
            "prob_ai": p_ai,
            "label": "ai" if d.label_a[i] else "real",
            "generator": class_names[int(d.label_b[i])],
            "threshold": cut,
            "caption": caption,
        }
        row.update(
            {f"p_{n}": (1 - p_ai) if k == 0 else p_ai * float(d.probs_b[i, k]) for k, n in enumerate(class_names)}
        )
        rows.append(row)
    return rows


DEMO_NOTICE = (
    "this model was trained on the embedded synthetic demo data: its scores say nothing about real images "
    "(train on real data, e.g. prepare.source: Rajarshi-Roy-research/Defactify_Image_Dataset)"
)


@dataclass(frozen=True)
class Scoring:
    """A model's own rule, from its ``scoring.json``: P(AI) calibrated by ``temperature``, the verdict ``ai`` at
    or above ``threshold`` (the operating point), ``real`` below ``lower``, ``unsure`` between; and the source
    of the data it was trained on (prepare.source). A model directory without the file (written before models
    carried one) is scored uncalibrated at 0.5 with no unsure band, and :meth:`notices` says so."""

    temperature: float = 1.0
    threshold: float = 0.5
    lower: float = 0.5
    trained_on: str = ""
    fitted: bool = False

    @classmethod
    def load(cls, model_dir: Path) -> Scoring:
        path = Path(model_dir) / SCORING_FILE
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
            verdict = raw["verdict"]
            return cls(
                float(raw["calibration"]["temperature"]),
                float(verdict["threshold"]),
                float(verdict["lower"]),
                str(raw["trained_on"]["source"]),
                True,
            )
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{path}: not a scoring file written by `aigid train` ({type(err).__name__}: {err})"
            ) from None

    def decide(self, logits_a, logits_b, threshold: float | None = None) -> Decision:
        """:func:`decide` by this rule, or with ``threshold`` at that one cut."""
        if threshold is None:
            return decide(logits_a, logits_b, self.threshold, self.lower, self.temperature)
        return decide(logits_a, logits_b, threshold, threshold, self.temperature)

    @property
    def synthetic(self) -> bool:
        return self.trained_on == "demo"

    def notices(self, model: str) -> list[str]:
        """What a user must know before reading this model's scores (said once per run, not per row)."""
        if not self.fitted:
            return [
                f"{model} has no {SCORING_FILE} (written by train and retrain): P(AI) is uncalibrated and the "
                f"verdict is cut at 0.5 with no unsure band"
            ]
        return [DEMO_NOTICE] if self.synthetic else []


def fit_temperature(logits_a: np.ndarray, labels_a: np.ndarray) -> float:
    """The temperature T minimising the log loss of sigmoid(logit / T) on these labelled rows (temperature
    scaling): one parameter, so the ranking, and the labels at 0.5, are unchanged."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits_a, dtype=np.float64), np.asarray(labels_a, dtype=np.float64)

    def log_loss(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    found = minimize_scalar(
        log_loss, bounds=(math.log(0.05), math.log(50.0)), method="bounded", options={"xatol": 1e-7}
    )
    return math.exp(found.x)


def threshold_at_fpr(prob_real_images, target_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on these real images is at most ``target_fpr``.

    An image is called AI when P(AI) >= threshold. With n real images, at most floor(target_fpr * n) may
    score at or above it, so the threshold is the next float above the (k+1)-th highest real score; ties
    at that score all fall below it, so the rate never exceeds the target. Float32 steps, as the model's
    probabilities are float32: a float64 step would round back onto the score where they are compared.
    """
    p = np.sort(np.asarray(prob_real_images, dtype=np.float32))[::-1]
    if len(p) == 0:
        raise ValueError("no real images to set a false-positive rate on")
    k = int(np.floor(target_fpr * len(p) + 1e-9))
    return float(np.nextafter(p[k], np.float32(np.inf))) if k < len(p) else 0.0


def lower_at_fnr(prob_ai_images, target_fnr: float) -> float:
    """The highest lower threshold below which at most ``target_fnr`` of these AI images fall (called real at
    P(AI) < lower): the (k+1)-th lowest AI score, k = floor(target_fnr * n); ties at it are not below it."""
    p = np.sort(np.asarray(prob_ai_images, dtype=np.float32))
    if len(p) == 0:
        raise ValueError("no AI images to set a false-negative rate on")
    k = int(np.floor(target_fnr * len(p) + 1e-9))
    return float(p[k]) if k < len(p) else 1.0


def fit_scoring(logits_a, labels_a, target_fpr: float, target_fnr: float, trained_on: dict) -> dict:
    """A model's ``scoring.json`` from its head A logits on the labelled validation rows: the temperature, then
    on the calibrated P(AI) the threshold with at most ``target_fpr`` of real images called AI and the lower
    threshold with at most ``target_fnr`` of AI images called real (where the two cross, the band is empty and
    the threshold decides alone), and what each achieves there."""
    labels_a = np.asarray(labels_a)
    if len(np.unique(labels_a)) < 2:
        raise DataError("the validation split needs both real and AI images to calibrate P(AI) and set the verdict")
    temperature = fit_temperature(logits_a, labels_a)
    prob = decide(logits_a, np.zeros((len(labels_a), 2)), temperature=temperature).prob_ai
    threshold = threshold_at_fpr(prob[labels_a == 0], target_fpr)
    lower = min(lower_at_fnr(prob[labels_a == 1], target_fnr), threshold)
    verdict = decide(logits_a, np.zeros((len(labels_a), 2)), threshold, lower, temperature).verdict
    decided = verdict != "unsure"
    return {
        "calibration": {"method": "temperature", "temperature": temperature, "fit_on": "validation", "rows": len(prob)},
        "verdict": {
            "threshold": threshold,
            "lower": lower,
            "target_fpr": target_fpr,
            "target_fnr": target_fnr,
            "validation_fpr": float((verdict[labels_a == 0] == "ai").mean()),
            "validation_fnr": float((verdict[labels_a == 1] == "real").mean()),
            "validation_coverage": float(decided.mean()),
        },
        "trained_on": trained_on,
    }
