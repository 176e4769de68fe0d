"""The `pseudolabel` stage: label an unlabeled pool with the trained model and keep the confident samples.

A sample passes when its Task A confidence max(p, 1 - p) AND its Task B confidence both exceed ``threshold``
(strictly). ``pseudolabel.selection`` says which of those are kept: ``threshold`` keeps them all (the paper);
``class_balanced`` keeps, per predicted class, the most confident up to a quota, so that the kept samples have
the class mix of the labelled train split (a model confident on some generators and not on real images would
otherwise add mostly the former). The kept samples are split 8:2 (by caption) into train/validation additions
for `retrain`.

How often are the kept labels right? The same rule applied to the labelled validation split says it with its
labels (:func:`estimate_precision`: the share of right labels among the validation rows it keeps, per task,
with a Wilson interval); below ``pseudolabel.min_precision`` on either task the stage warns (it never fails).
The estimate holds for a pool like the validation split: a pool of another source can be far worse, which only
the pool's own labels, where known, show (``precision_a``, ``precision_b``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from datasets import DatasetDict

from aigid.core import stage
from aigid.core.data import COLUMNS, DataError, open_dataset, save_dataset, schema, split_by_caption
from aigid.core.files import write_json
from aigid.detector.cache import open_features, predict_from_features
from aigid.detector.infer import RunOptions, predict_logits
from aigid.detector.model import load_detector
from aigid.detector.runtime import configure
from aigid.detector.scores import Decision, decide
from aigid.tracking.runs import log_data, log_results, stage_run

log = logging.getLogger(__name__)
PARAMS = (
    "threshold",
    "seed",
    "pseudolabel",
    "train.num_workers",
    "train.freeze_encoders",
    "inference",
    "compute",
    "mlflow",
)
# The DVC metrics; the rest: the report.
HEADLINE = (
    "kept",
    "kept_fraction",
    "precision_a",
    "precision_b",
    "estimated_precision_a",
    "estimated_precision_b",
    "estimated_kept",
)
CONFIDENCE, Z = 0.95, 1.959963984540054  # the Wilson interval's level and its normal quantile


@dataclass(frozen=True)
class Paths:
    model: Path = stage.path("models/base", "Model directory that labels the pool.", exists=True)
    data: Path = stage.path("data/prepared", "Prepared dataset holding the pool split.", exists=True)
    features: Path = stage.path("data/features", "Cached encoder features (used with train.freeze_encoders).")
    out: Path = stage.path("data/pseudolabel", "Directory for the kept samples, split into train/validation additions.")
    metrics: Path = stage.path(
        "metrics/pseudolabel.json",
        "Headline: kept, and the share of right pseudo-labels where the pool's labels are known (DVC metrics).",
    )
    report: Path = stage.path("reports/pseudolabel.json", "Counts kept, right pseudo-labels per class.")


def run(params, paths: Paths) -> dict:
    """Label pseudolabel.pool with MODEL; keep samples whose Task A and Task B confidences exceed `threshold`
    (all of them, or per predicted class up to the train split's class mix: pseudolabel.selection)."""
    configure(params.compute)
    with stage_run("pseudolabel", params):
        report = pseudolabel(params, paths)
        log_results({k: report[k] for k in HEADLINE})
        mlflow.log_dict(report, "report.json")
    write_json(paths.metrics, {k: report[k] for k in HEADLINE})
    write_json(paths.report, report)
    return report


command = stage.command("pseudolabel", run, Paths, PARAMS)


def select_confident(conf_a: np.ndarray, conf_b: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the samples whose confidences on both tasks exceed ``threshold``."""
    return np.flatnonzero((np.asarray(conf_a) > threshold) & (np.asarray(conf_b) > threshold))


def class_quotas(available: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """Per class, how many samples to keep so that the kept samples have the class ``mix`` (shares summing to
    1): the largest total N that every class can fill at its share from its ``available`` samples, N =
    min over classes with a share of available_k / mix_k, and class k keeps floor(N * mix_k). A class with a
    share and nothing available makes N = 0: nothing is kept rather than a shifted mix."""
    available, mix = np.asarray(available), np.asarray(mix, dtype=float)
    present = mix > 0
    total = float(np.min(available[present] / mix[present])) if present.any() else 0.0
    return np.minimum(np.floor(total * mix + 1e-9).astype(int), available)


def select_class_balanced(
    conf_a: np.ndarray, conf_b: np.ndarray, label_b: np.ndarray, threshold: float, mix: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the samples above ``threshold`` that keep, per predicted class k (``label_b``), the
    :func:`class_quotas` most confident ones (by the smaller of the two confidences, the quantity the
    threshold tests; ties in pool order); and the quotas."""
    conf_a, conf_b, label_b = np.asarray(conf_a), np.asarray(conf_b), np.asarray(label_b)
    candidates = select_confident(conf_a, conf_b, threshold)
    quotas = class_quotas(np.bincount(label_b[candidates], minlength=len(mix)), mix)
    confidence = np.minimum(conf_a, conf_b)
    keep = []
    for k, quota in enumerate(quotas):
        of_k = candidates[label_b[candidates] == k]
        keep.append(of_k[np.argsort(-confidence[of_k], kind="stable")[:quota]])
    return np.sort(np.concatenate(keep)) if keep else candidates[:0], quotas


def pseudolabel(params, paths: Paths) -> dict:
    """Label the pool split and write the confident samples. In frozen-encoder mode the model's heads read
    the pool's cached encoder features instead of running the encoders."""
    q, threshold = params.pseudolabel, params.threshold
    data = prepared_splits(paths.data, q.pool)
    ds = data[q.pool]
    log_data(paths.data, data, {q.pool: "pool", "validation": "validation"})
    detector = load_detector(paths.model, params.inference.precision)
    names = tuple(detector.model.config.class_names)
    mix = np.bincount(np.asarray(data["train"]["Label_B"]), minlength=len(names)) / len(data["train"])

    def keep_rule(pred: Decision) -> tuple[np.ndarray, np.ndarray | None]:
        if q.selection == "class_balanced":
            return select_class_balanced(pred.conf_a, pred.conf_b, pred.label_b, threshold, mix)
        return select_confident(pred.conf_a, pred.conf_b, threshold), None

    pred = _label(params, paths, detector, ds, q.pool)
    passed = select_confident(pred.conf_a, pred.conf_b, threshold)
    keep, quotas = keep_rule(pred)
    validation = data["validation"]
    on_validation = _label(params, paths, detector, validation, "validation")
    estimate = estimate_precision(validation, on_validation, keep_rule(on_validation)[0])
    warn_if_imprecise(estimate, q.min_precision)
    if len(keep) == 0:
        log.warning(
            "no '%s' sample kept (threshold=%s, selection=%s): retrain will see the original data only",
            q.pool,
            threshold,
            q.selection,
        )
    train_part, val_part = split_kept(labelled_rows(ds, pred, keep), q.validation_fraction, params.seed)
    save_dataset(DatasetDict(train=train_part, validation=val_part), paths.out)
    log.info(
        "kept %d of %d pool samples (%d above threshold %s, selection %s)",
        len(keep),
        len(ds),
        len(passed),
        threshold,
        q.selection,
    )
    return {
        "pool": q.pool,
        "threshold": threshold,
        "selection": q.selection,
        "pool_rows": len(ds),
        "passed_threshold": int(len(passed)),
        "kept": int(len(keep)),
        "kept_fraction": len(keep) / len(ds),
        "train_rows": len(train_part),
        "validation_rows": len(val_part),
        **label_quality(ds, pred, passed, keep, names, quotas),
        "estimated_precision_a": estimate["task_a"]["precision"],
        "estimated_precision_b": estimate["task_b"]["precision"],
        "estimated_kept": estimate["kept"],
        "estimate": estimate,
    }


def prepared_splits(path: Path, pool: str):
    """The prepared splits, checked to hold the pool and the labelled validation split the estimate needs."""
    data = open_dataset(path)
    if pool not in data:
        raise DataError(
            f"{path}: no '{pool}' split to pseudo-label (splits: {', '.join(data)}); "
            "set pseudolabel.pool to one of them"
        )
    if "validation" not in data:
        raise DataError(
            f"{path}: no 'validation' split (splits: {', '.join(data)}); pseudolabel applies its rule to it "
            "to estimate how many kept labels are right"
        )
    return data


def split_kept(kept, fraction: float, seed: int):
    """The kept rows split by caption into train and validation additions (the paper's 8:2); with fewer than
    two captions, all of them go to train."""
    if len(set(kept["caption_id"])) >= 2:
        return split_by_caption(kept, fraction, seed)
    return kept, kept.select([])


def _label(params, paths: Paths, detector, ds, split: str) -> Decision:
    """The model's decisions on a split, from its images and captions or, in frozen-encoder mode, from their
    cached features."""
    model = detector.model
    if params.train.freeze_encoders:
        feats = open_features(paths.features, model.config.fusion)[split]
        logits_a, logits_b = predict_from_features(model, feats)
    else:
        options = RunOptions(params.pseudolabel.batch_size, params.train.num_workers, progress=True)
        logits_a, logits_b = predict_logits(detector, ds, options)
    # The paper's confidences: the raw sigmoid and softmax, not the model's calibrated P(AI) (its scoring.json).
    return decide(logits_a, logits_b)


def wilson(correct: int, n: int, z: float = Z) -> tuple[float, float] | tuple[None, None]:
    """The Wilson score interval of a proportion ``correct`` of ``n`` (None, None when n is 0)."""
    if n == 0:
        return None, None
    p = correct / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def estimate_precision(validation, pred: Decision, keep: np.ndarray) -> dict:
    """How often the kept labels are right, estimated on the labelled ``validation`` rows the keep rule keeps
    (``keep``, from the model's decisions ``pred`` on them): per task the share of right labels with its Wilson
    interval (None where it keeps none)."""
    out: dict = {
        "split": "validation",
        "rows": len(validation),
        "kept": int(len(keep)),
        "confidence": CONFIDENCE,
        "interval": "wilson",
    }
    for task, column, label in (("task_a", "Label_A", pred.label_a), ("task_b", "Label_B", pred.label_b)):
        correct = int((label[keep] == np.asarray(validation[column])[keep]).sum())
        low, high = wilson(correct, len(keep))
        out[task] = {
            "correct": correct,
            "precision": correct / len(keep) if len(keep) else None,
            "ci_low": low,
            "ci_high": high,
        }
    return out


def warn_if_imprecise(estimate: dict, min_precision: float) -> None:
    """One warning line when a task's estimated precision is below ``min_precision`` or, with a floor set, when
    the rule keeps no validation row (nothing to estimate from)."""
    if min_precision <= 0:
        return
    if estimate["kept"] == 0:
        log.warning(
            "pseudo-label precision unknown: the keep rule keeps none of the %d validation rows "
            "(pseudolabel.min_precision=%s)",
            estimate["rows"],
            min_precision,
        )
        return
    low = [
        f"Task {task[-1].upper()} {e['precision']:.3f} ({e['correct']}/{estimate['kept']}, "
        f"{100 * estimate['confidence']:g}% CI {e['ci_low']:.3f}-{e['ci_high']:.3f})"
        for task in ("task_a", "task_b")
        if (e := estimate[task])["precision"] < min_precision
    ]
    if low:
        log.warning(
            "pseudo-labels estimated below pseudolabel.min_precision=%s on the validation split: %s; "
            "retrain may learn wrong labels",
            min_precision,
            "; ".join(low),
        )


def labelled_rows(ds, pred: Decision, keep: np.ndarray):
    """The kept pool rows with the predicted labels in place of their own, their confidences, and their row in
    the pool split (where retrain finds their cached features)."""
    kept = ds.select(keep).remove_columns(["Label_A", "Label_B"])
    kept = kept.add_column("Label_A", pred.label_a[keep].tolist()).add_column("Label_B", pred.label_b[keep].tolist())
    kept = kept.select_columns(list(COLUMNS)).cast(schema())
    kept = kept.add_column("Confidence_A", pred.conf_a[keep].tolist())
    kept = kept.add_column("Confidence_B", pred.conf_b[keep].tolist())
    return kept.add_column("pool_row", keep.tolist())


def label_quality(ds, pred: Decision, passed, keep, names, quotas) -> dict:
    """How good the kept labels are where the pool's true labels are known (the demo's, the test split's):
    overall and per predicted class, with what passed the threshold and each class's quota."""
    label_a, label_b = pred.label_a[keep], pred.label_b[keep]
    true_a, true_b = np.asarray(ds["Label_A"])[keep], np.asarray(ds["Label_B"])[keep]
    quality = {
        "correct_a": int((label_a == true_a).sum()),
        "correct_b": int((label_b == true_b).sum()),
        "precision_a": float((label_a == true_a).mean()) if len(keep) else None,
        "precision_b": float((label_b == true_b).mean()) if len(keep) else None,
        "per_class": {},
    }
    passed_b = pred.label_b[passed]
    for k, name in enumerate(names):
        as_k = label_b == k
        correct = int((true_b[as_k] == k).sum())
        quality["per_class"][name] = {
            "passed_threshold": int((passed_b == k).sum()),
            "kept": int(as_k.sum()),
            "correct": correct,
            "precision": float(correct / as_k.sum()) if as_k.any() else None,
        }
        if quotas is not None:
            quality["per_class"][name]["quota"] = int(quotas[k])
    return quality
