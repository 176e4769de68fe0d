"""The `pseudolabel` stage: label an unlabeled pool with the trained model and keep the confident samples.

A sample is kept when its Task A confidence max(p, 1 - p) AND its Task B confidence both exceed ``threshold``
(strictly). The kept samples are split 8:2 (by caption) into train/validation additions for `retrain`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from datasets import DatasetDict

from . import stage
from .data import COLUMNS, DataError, open_dataset, save_dataset, schema, split_by_caption
from .features import open_features, predict_from_features
from .files import write_json
from .infer import RunOptions, predict_logits
from .model import decide, load_detector
from .runtime import configure
from .tracking import log_data, log_results, stage_run

log = logging.getLogger(__name__)
PARAMS = ("threshold", "seed", "pseudolabel", "train.num_workers", "train.freeze_encoders", "inference", "mlflow")
HEADLINE = ("kept", "kept_fraction", "precision_a", "precision_b")  # the DVC metrics; the rest: the report


@dataclass(frozen=True)
class Paths:
    model: Path = stage.path("models/base", "Model directory that labels the pool.", exists=True)
    data: Path = stage.path("data/prepared", "Prepared dataset holding the pool split.", exists=True)
    features: Path = stage.path("data/features", "Cached encoder features (used with train.freeze_encoders).")
    out: Path = stage.path("data/pseudolabel", "Directory for the kept samples, split into train/validation "
                           "additions.")
    metrics: Path = stage.path("metrics/pseudolabel.json", "Headline: kept, and the share of right pseudo-labels "
                               "where the pool's labels are known (DVC metrics).")
    report: Path = stage.path("reports/pseudolabel.json", "Counts kept, right pseudo-labels per class.")


def run(params, paths: Paths) -> dict:
    """Label pseudolabel.pool with MODEL; keep samples whose Task A and Task B confidences exceed `threshold`."""
    configure()
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


def pseudolabel(params, paths: Paths) -> dict:
    """Label the pool split and write the confident samples. In frozen-encoder mode the model's heads read
    the pool's cached encoder features instead of running the encoders."""
    q, threshold = params.pseudolabel, params.threshold
    pool, data_dir = q.pool, paths.data
    data = open_dataset(data_dir)
    if pool not in data:
        raise DataError(f"{data_dir}: no '{pool}' split to pseudo-label (splits: {', '.join(data)}); "
                        f"set pseudolabel.pool to one of them")
    ds = data[pool]
    log_data(data_dir, data, {pool: "pool"})
    detector = load_detector(paths.model)
    model = detector.model
    if params.train.freeze_encoders:
        logits_a, logits_b = predict_from_features(model, open_features(paths.features)[pool])
    else:
        logits_a, logits_b = predict_logits(detector, ds, RunOptions(q.batch_size, params.train.num_workers,
                                                                     params.inference.precision))
    pred = decide(torch.from_numpy(logits_a), torch.from_numpy(logits_b))
    keep = select_confident(pred.conf_a.numpy(), pred.conf_b.numpy(), threshold)
    if len(keep) == 0:
        log.warning("no '%s' sample passes threshold=%s: retrain will see the original data only", pool, threshold)
    label_a, label_b = pred.label_a.numpy()[keep], pred.label_b.numpy()[keep]
    true_a, true_b = np.asarray(ds["Label_A"])[keep], np.asarray(ds["Label_B"])[keep]
    kept = ds.select(keep).remove_columns(["Label_A", "Label_B"])
    kept = kept.add_column("Label_A", label_a.tolist()).add_column("Label_B", label_b.tolist())
    kept = kept.select_columns(list(COLUMNS)).cast(schema())
    kept = kept.add_column("Confidence_A", pred.conf_a.numpy()[keep].tolist())
    kept = kept.add_column("Confidence_B", pred.conf_b.numpy()[keep].tolist())
    kept = kept.add_column("pool_row", keep.tolist())  # where the sample is in the pool split (and its features)
    if len(set(kept["caption_id"])) >= 2:
        train_part, val_part = split_by_caption(kept, q.validation_fraction, params.seed)
    else:  # nothing (or one caption) to split: it all goes to train
        train_part, val_part = kept, kept.select([])
    save_dataset(DatasetDict(train=train_part, validation=val_part), paths.out)

    metrics = {"pool": pool, "threshold": threshold, "pool_rows": len(ds), "kept": int(len(keep)),
               "kept_fraction": len(keep) / len(ds), "train_rows": len(train_part),
               "validation_rows": len(val_part),
               # The pool's true labels, where known (the demo's, the test split's), say how good they are.
               "correct_a": int((label_a == true_a).sum()), "correct_b": int((label_b == true_b).sum()),
               "precision_a": float((label_a == true_a).mean()) if len(keep) else None,
               "precision_b": float((label_b == true_b).mean()) if len(keep) else None,
               "per_class": {}}
    for k, name in enumerate(model.config.class_names):
        as_k = label_b == k
        metrics["per_class"][name] = {"kept": int(as_k.sum()), "correct": int((true_b[as_k] == k).sum())}
    log.info("kept %d of %d pool samples at threshold %s", len(keep), len(ds), threshold)
    return metrics
