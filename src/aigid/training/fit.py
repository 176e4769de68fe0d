"""Training the detector as the `train` and `retrain` stages do it: the rows, an MLflow run, the best model saved.

:func:`train_and_write` gathers the rows (the prepared splits, or with ``train.freeze_encoders`` their cached
features, plus retrain's pseudo-labelled additions), hands them to :func:`aigid.training.trainer.train_detector`,
logs the run, and saves the best model with its ``scoring.json`` (:class:`aigid.detector.scores.Scoring`): the
temperature calibrating P(AI) and the verdict's two thresholds, fitted on the labelled validation split (never
on pseudo-labels), and the data's source.

Checkpoints live in ``checkpoints/<stage>/<fingerprint>``, outside the stage's DVC outputs. A run that was
killed leaves them there, and the next run with the same params, data and encoders (same fingerprint)
resumes from the last complete one instead of starting over; they are deleted when the stage completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from datasets import concatenate_datasets
from transformers import Trainer, TrainerCallback

from aigid.core import stage
from aigid.core.data import DataError, class_names_of, concat, open_dataset
from aigid.core.files import atomic_path, write_json, writing
from aigid.detector.cache import FeatureRows, open_features
from aigid.detector.model import save_detector
from aigid.detector.runtime import configure
from aigid.detector.scores import SCORING_FILE, decide, fit_scoring
from aigid.tracking.metrics import calibration, score
from aigid.tracking.runs import is_main_process, log_data, log_results, stage_run
from aigid.training.trainer import (
    TrainingRows,
    drop_class,
    launch,
    train_detector,
    trainer_settings,
    training_arguments,
)

PARAMS = ("seed", "model", "train", "verdict", "prepare.source", "compute", "mlflow")
HEADLINE = ("f1_weighted_a", "f1_weighted_b", "best_epoch")  # the DVC metrics; the rest goes to the report


@dataclass(frozen=True)
class TrainingPaths:
    """The inputs both stages read; each stage's paths add its outputs (``out``, ``metrics``, ``report``,
    ``history``) and retrain's its ``pseudo``."""

    data: Path = stage.path("data/prepared", "Prepared dataset (train and validation splits).", exists=True)
    encoders: Path = stage.path("models/encoders", "Starting encoders written by the encoders stage.", exists=True)
    features: Path = stage.path("data/features", "Cached encoder features (used with train.freeze_encoders).")


def train_and_write(params, paths, stage_name: str, pseudo: Path | None = None) -> dict:
    """Train the detector on the prepared train split (Trainer; best checkpoint by weighted F1 on Task A), with
    ``pseudo`` (retrain) on the pseudo-labelled additions too; write the stage's metrics, report and history."""
    configure(params.compute)
    result = fit(params, paths, stage_name, pseudo)
    if is_main_process():  # under torchrun every rank gets here; rank 0 writes
        write_json(paths.metrics, {k: result["metrics"][k] for k in HEADLINE})
        write_json(paths.report, result["metrics"])
        write_json(paths.history, result["history"])
    return result["metrics"]


def compute_metrics(eval_pred, class_names: tuple[str, ...]) -> dict[str, float]:
    logits_a, logits_b = eval_pred.predictions
    labels_a, labels_b = eval_pred.label_ids
    pred = decide(logits_a, logits_b)
    s = score(labels_a, labels_b, pred.label_a, pred.label_b, class_names)
    return {f"{name}_{task[-1]}": value for task in ("task_a", "task_b") for name, value in s[task].items()}


def fit(params, paths, stage: str = "train", pseudo: Path | None = None, checkpoint_dir: Path | None = None):
    """Train a fresh detector from the starting encoders (:func:`aigid.training.trainer.train_detector`) in the
    stage's MLflow run; write the best one to ``paths.out`` with its scoring rule (``paths``: the stage's, a
    :class:`TrainingPaths` with its ``out``).

    With ``pseudo`` (the retrain stage), the pseudo-labelled train/validation additions are concatenated to the
    original splits. With ``train.freeze_encoders`` the rows are the cached encoder features in
    ``paths.features`` and only the fusion layer and heads learn. Returns the best checkpoint's validation
    metrics and the per-epoch history.
    """
    data = open_dataset(paths.data)
    class_names = class_names_of(data["train"])
    train_ds, val_ds, labelled_val, features_dir = training_rows(params, paths, data, class_names, pseudo)
    state = launch()  # only rank 0 of a multi-process launch logs to MLflow and writes outputs
    stage_dir = checkpoint_dir or Path("checkpoints") / stage
    key = fingerprint(params, paths.data, paths.encoders, pseudo, features_dir, processes=state.num_processes)
    args = training_arguments(params.train, params.seed, stage, stage_dir / key, state)
    with stage_run(stage, params) as run:  # None on the ranks other than 0
        if run is not None:
            log_inputs(data, paths, pseudo)
            mlflow.log_params(trainer_settings(args, state.num_processes))
        rows = TrainingRows(train_ds, val_ds, class_names)
        callbacks = [EpochCurves()] if run is not None else []
        with writing(stage_dir / key):  # a disk that fills while a checkpoint is saved is one line naming it
            trained = train_detector(
                paths.encoders, rows, params.model, params.train, args, key, compute_metrics, callbacks
            )
        sizes = {"train": len(train_ds), "validation": len(val_ds)}
        scoring = fit_rule(params, trained.trainer, labelled_val, sizes)
        metrics = {**trained.metrics, "scoring": {**scoring["calibration"], **scoring["verdict"]}}
        if run is not None:
            log_results({k: metrics[k] for k in HEADLINE})
            mlflow.log_dict(metrics, "report.json")
        trained.trainer.accelerator.wait_for_everyone()  # no rank still reads a checkpoint when rank 0 deletes them
        if trained.trainer.is_world_process_zero():
            save_best(trained.detector, params.train.holdout, scoring, paths.out, stage_dir)
    return {"metrics": metrics, "history": trained.history, "run_id": run.info.run_id if run is not None else None}


def training_rows(params, paths: TrainingPaths, data, class_names: tuple[str, ...], pseudo_dir: Path | None):
    """The train and validation rows (images and captions, or with ``train.freeze_encoders`` their cached
    features), the pseudo-labelled additions included and the held-out class dropped; the labelled validation
    rows alone (the scoring rule is fitted on them); and the features directory when it is an input."""
    t = params.train
    features_dir = paths.features
    if t.freeze_encoders:
        train_ds, val_ds, labelled = feature_splits(params, features_dir, pseudo_dir)
    else:
        train_ds, val_ds = data["train"], data["validation"]
        labelled = data["validation"]
        if pseudo_dir is not None:
            pseudo = open_dataset(pseudo_dir)
            train_ds, val_ds = concat(train_ds, pseudo["train"]), concat(val_ds, pseudo["validation"])
        features_dir = None  # not an input of full fine-tuning
    splits = [train_ds, val_ds, labelled]
    if t.holdout != "none":  # after the pseudo-labels, so none predicted as the held-out class comes back
        splits = [drop_class(ds, class_names, t.holdout) for ds in splits]
    if t.freeze_encoders:
        splits = [FeatureRows(ds) for ds in splits]
    return (*splits, features_dir)


def fit_rule(params, trainer: Trainer, labelled_val, rows: dict[str, int]) -> dict:
    """The best model's ``scoring.json`` (:func:`aigid.detector.scores.fit_scoring`) from its logits on the
    labelled validation rows, with the calibration error of P(AI) there before and after."""
    out = trainer.predict(labelled_val)
    (logits_a, _), (labels_a, _) = out.predictions, out.label_ids
    source = params.prepare.source
    trained_on = {"source": source, "synthetic": source == "demo", "rows": rows, "params": _training_params(params)}
    v = params.verdict
    scoring = fit_scoring(logits_a, labels_a, v.target_fpr, v.target_fnr, trained_on)
    temperature = scoring["calibration"]["temperature"]
    for name, t in (("ece_uncalibrated", 1.0), ("ece", temperature)):
        prob = decide(logits_a, np.zeros((len(labels_a), 2)), temperature=t).prob_ai
        scoring["calibration"][name] = calibration(labels_a, prob)[0]["ece"]
    return scoring


def _training_params(params) -> dict:
    return {k: v for k, v in params.declared().items() if k.startswith(("seed", "model.", "train."))}


def save_best(detector, holdout: str, scoring: dict, model_dir: Path, stage_dir: Path) -> None:
    """Write the detector (the best checkpoint's weights, loaded in place) with its scoring rule and delete the
    stage's checkpoints."""
    model, tokenizer, processor, _ = detector
    model.config.holdout = holdout  # evaluate reads it to report the unseen generator
    with atomic_path(model_dir) as tmp:
        save_detector(model, tokenizer, processor, tmp)
        write_json(tmp / SCORING_FILE, scoring)
    shutil.rmtree(stage_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        stage_dir.parent.rmdir()  # only if no other stage's checkpoints are there


def feature_splits(params, features_dir: Path | None, pseudo_dir: Path | None):
    """Train and validation rows as cached features; pseudo-labelled rows are looked up in the pool's features
    by their ``pool_row`` and carry their predicted labels."""
    if features_dir is None:
        raise DataError("train.freeze_encoders is true: pass the features stage output (--features)")
    feats = open_features(features_dir, params.model.fusion)
    train_ds, val_ds = feats["train"], feats["validation"]
    labelled = val_ds
    if pseudo_dir is not None:
        pseudo, pool = open_dataset(pseudo_dir), feats[params.pseudolabel.pool]
        added = []
        for part in ("train", "validation"):
            rows = pool.select(pseudo[part]["pool_row"]).remove_columns(["Label_A", "Label_B"])
            added.append(
                rows.add_column("Label_A", pseudo[part]["Label_A"])
                .add_column("Label_B", pseudo[part]["Label_B"])
                .cast(train_ds.features)
            )
        train_ds, val_ds = concatenate_datasets([train_ds, added[0]]), concatenate_datasets([val_ds, added[1]])
    return train_ds, val_ds, labelled


class EpochCurves(TrainerCallback):
    """Per-epoch curves in the stage's MLflow run, ``history/<name>`` at step = epoch: every validation score
    (``history/f1_weighted_a``, ``history/f1_weighted_b``, ...) and the training loss, as train_history.json
    holds them. Logs only on rank 0 (its run is the active one)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs):
            return
        values = {
            f"history/{k.removeprefix('eval_')}": float(v)
            for k, v in logs.items()
            if isinstance(v, (int, float))
            and (
                k in ("loss", "grad_norm", "learning_rate")
                or k.startswith("eval_")
                and not k.endswith(("runtime", "per_second"))
            )
        }
        if values:
            mlflow.log_metrics(values, step=round(state.epoch or 0))


def log_inputs(data, paths: TrainingPaths, pseudo_dir: Path | None) -> None:
    """The data the model learns from, as MLflow datasets of the run: the prepared train and validation splits
    and, for retrain, the pseudo-labelled additions."""
    log_data(paths.data, data, {"train": "training", "validation": "validation"})
    if pseudo_dir is not None:
        log_data(pseudo_dir, open_dataset(pseudo_dir), {"train": "training", "validation": "validation"})


def fingerprint(params, *inputs: Path | None, processes: int = 1) -> str:
    """What a checkpoint depends on: the params the stage reads (its declared keys, as logged), the identity
    of its input data and, under a multi-process launch, the number of processes (each saves its own RNG
    state)."""
    h = hashlib.sha1(json.dumps(params.declared(), sort_keys=True).encode())
    if processes > 1:
        h.update(f"processes:{processes}".encode())
    for path in filter(None, inputs):
        for file in sorted(f for f in path.rglob("*") if f.is_file()):
            h.update(f"{file.relative_to(path).as_posix()}:{file.stat().st_size}".encode())
            if file.suffix == ".json":  # datasets' state.json fingerprints, encoder configs
                h.update(file.read_bytes())
    return h.hexdigest()[:12]
