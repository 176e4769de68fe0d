"""The `train` and `retrain` stages: fine-tune the detector with the Hugging Face Trainer.

Evaluation every epoch, the best checkpoint chosen by weighted F1 on Task A (as the paper reports it; the
reference code selected by binary F1), only the latest checkpoint kept, and the best model saved at the end with
its ``scoring.json`` (:class:`aigid.detector.scores.Scoring`): the temperature calibrating P(AI) and the verdict's
two thresholds, fitted on the labelled validation split (never on pseudo-labels), and the data's source.

Checkpoints live in ``checkpoints/<stage>/<fingerprint>``, outside the stage's DVC outputs. A run that was
killed leaves them there, and the next run with the same params, data and encoders (same fingerprint)
resumes from the last one instead of starting over; they are deleted when the stage completes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import concatenate_datasets
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from aigid.core import stage
from aigid.core.data import Collator, DataError, class_names_of, concat, open_dataset
from aigid.core.errors import ParamsError
from aigid.core.files import atomic_path, write_json, writing
from aigid.detector.cache import FeatureCollator, FeatureRows, open_features
from aigid.detector.model import DetectorHeads, build_detector, save_detector
from aigid.detector.runtime import configure
from aigid.detector.scores import SCORING_FILE, decide, fit_scoring
from aigid.tracking.metrics import calibration, score
from aigid.tracking.runs import is_main_process, log_data, log_results, stage_run

log = logging.getLogger(__name__)
BEST_METRIC = "f1_weighted_a"
PARAMS = ("seed", "model", "train", "verdict", "prepare.source", "compute", "mlflow")
HEADLINE = ("f1_weighted_a", "f1_weighted_b", "best_epoch")  # the DVC metrics; the rest goes to the report


@dataclass(frozen=True)
class Paths:
    data: Path = stage.path("data/prepared", "Prepared dataset (train and validation splits).", exists=True)
    encoders: Path = stage.path("models/encoders", "Starting encoders written by the encoders stage.", exists=True)
    features: Path = stage.path("data/features", "Cached encoder features (used with train.freeze_encoders).")
    out: Path = stage.path(
        "models/base", "Directory for the best model (self-contained: weights, configs, tokenizer, processor)."
    )
    metrics: Path = stage.path(
        "metrics/train.json", "Headline validation metrics of the best checkpoint (DVC metrics)."
    )
    report: Path = stage.path("reports/train.json", "Every validation metric of the best checkpoint.")
    history: Path = stage.path("metrics/train_history.json", "Per-epoch validation metrics (a DVC plot).")
    pseudo = None  # retrain's paths add the pseudo-labelled additions


def run(params, paths: Paths, stage_name: str = "train") -> dict:
    """Train the detector on the prepared train split (Trainer; best checkpoint by weighted F1 on Task A)."""
    configure(params.compute)
    result = fit(params, paths, stage_name)
    if is_main_process():  # under torchrun every rank gets here; rank 0 writes
        write_json(paths.metrics, {k: result["metrics"][k] for k in HEADLINE})
        write_json(paths.report, result["metrics"])
        write_json(paths.history, result["history"])
    return result["metrics"]


command = stage.command("train", run, Paths, PARAMS)


def compute_metrics(eval_pred, class_names: tuple[str, ...]) -> dict[str, float]:
    logits_a, logits_b = eval_pred.predictions
    labels_a, labels_b = eval_pred.label_ids
    pred = decide(logits_a, logits_b)
    s = score(labels_a, labels_b, pred.label_a, pred.label_b, class_names)
    return {f"{name}_{task[-1]}": value for task in ("task_a", "task_b") for name, value in s[task].items()}


def fit(params, paths: Paths, stage: str = "train", checkpoint_dir: Path | None = None) -> dict:
    """Train a fresh detector from the starting encoders; write the best one to ``paths.out``.

    With ``paths.pseudo`` (the retrain stage), the pseudo-labelled train/validation additions are concatenated
    to the original splits. With ``train.freeze_encoders`` the rows are the cached encoder features in
    ``paths.features`` and only the fusion layer and heads learn. Returns the best checkpoint's validation
    metrics and the per-epoch history.
    """
    data = open_dataset(paths.data)
    class_names = class_names_of(data["train"])
    train_ds, val_ds, labelled_val, features_dir = training_rows(params, paths, data, class_names)
    # Under torchrun / accelerate launch this sets up the process group that the Trainer then uses for
    # DistributedDataParallel; a plain run is one process. Only rank 0 logs to MLflow and writes outputs.
    # Without CUDA, accelerate makes a launch multi-CPU (gloo) only when told to use the CPU.
    cpu = not torch.cuda.is_available() and torch.distributed.is_torchelastic_launched()
    launch = PartialState(cpu=cpu)
    stage_dir = checkpoint_dir or Path("checkpoints") / stage
    checkpoint_dir = stage_dir / fingerprint(
        params, paths.data, paths.encoders, paths.pseudo, features_dir, processes=launch.num_processes
    )
    # Rank 0 picks (and cleans) the checkpoint to resume from; every rank resumes from that one.
    resume = last_complete_checkpoint(checkpoint_dir, launch.num_processes) if launch.is_main_process else None
    resume = broadcast_object_list([resume])[0]
    if resume and launch.is_main_process:
        log.info("resuming %s from the last checkpoint in %s (%s)", stage, checkpoint_dir, resume.name)
    with stage_run(stage, params) as run:  # None on the ranks other than 0
        set_seed(params.seed)  # before the fusion layer and heads are initialised
        detector = build_detector(
            str(paths.encoders / "text"),
            str(paths.encoders / "vision"),
            params.model.fusion_dim,
            params.model.max_text_length,
            class_names,
            params.model.fusion,
        )
        args = training_arguments(
            params, stage, checkpoint_dir, per_process_batch(params.train.batch_size, launch.num_processes), cpu
        )
        curves = EpochCurves()
        trainer = detector_trainer(params, detector, args, train_ds, val_ds, class_names, [curves] if run else None)
        if run is not None:
            log_inputs(data, paths, paths.pseudo)
            mlflow.log_params(trainer_settings(args, launch.num_processes))
        with writing(checkpoint_dir):  # a disk that fills while a checkpoint is saved is one line naming it
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        curves.active = False  # the evaluation below repeats the best epoch
        best = trainer.evaluate()  # the best checkpoint is loaded at this point; every rank takes part
        history = epoch_history(trainer.state.log_history)
        metrics = {
            "best_epoch": _best_epoch(history),
            "train_rows": len(train_ds),
            "validation_rows": len(val_ds),
            **{k[5:]: v for k, v in best.items() if k.startswith("eval_") and k[5:].split("_")[0] in SCORES},
        }
        scoring = fit_rule(params, trainer, labelled_val, {"train": len(train_ds), "validation": len(val_ds)})
        metrics["scoring"] = {**scoring["calibration"], **scoring["verdict"]}
        if run is not None:
            log_results({k: metrics[k] for k in HEADLINE})
            mlflow.log_dict(metrics, "report.json")
        trainer.accelerator.wait_for_everyone()  # no rank still reads a checkpoint when rank 0 deletes them
        if trainer.is_world_process_zero():
            save_best(detector, params.train.holdout, scoring, paths.out, stage_dir)
    return {"metrics": metrics, "history": history, "run_id": run.info.run_id if run is not None else None}


# The validation scores a report keeps (f1_weighted_a, balanced_accuracy_b, ...; not loss or timings).
SCORES = ("f1", "accuracy", "precision", "recall", "balanced")


def training_rows(params, paths: Paths, data, class_names: tuple[str, ...]):
    """The train and validation rows (images and captions, or with ``train.freeze_encoders`` their cached
    features), the pseudo-labelled additions included and the held-out class dropped; the labelled validation
    rows alone (the scoring rule is fitted on them); and the features directory when it is an input."""
    t = params.train
    features_dir = paths.features
    if t.freeze_encoders:
        train_ds, val_ds, labelled = _feature_splits(params, features_dir, paths.pseudo)
    else:
        train_ds, val_ds = data["train"], data["validation"]
        labelled = data["validation"]
        if paths.pseudo is not None:
            pseudo = open_dataset(paths.pseudo)
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


def training_arguments(params, stage: str, checkpoint_dir: Path, batch_size: int, cpu: bool) -> TrainingArguments:
    """The Trainer's arguments: params.yaml's settings, an evaluation and a checkpoint per epoch, the best epoch
    by weighted Task A F1 loaded at the end."""
    t = params.train
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        run_name=stage,
        report_to="none",
        seed=params.seed,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of all steps
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        num_train_epochs=t.epochs,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model=BEST_METRIC,
        greater_is_better=True,
        remove_unused_columns=False,
        label_names=["labels_a", "labels_b"],
        dataloader_num_workers=t.num_workers,
        dataloader_persistent_workers=t.num_workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        use_cpu=cpu,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )


def detector_trainer(params, detector, args, train_ds, val_ds, class_names, callbacks) -> DetectorTrainer:
    """The Trainer of the detector, or with ``train.freeze_encoders`` of its fusion layer and heads alone (the
    detector's own modules, updated in place) on cached features: captions were encoded once, so there is
    nothing to drop either."""
    model, tokenizer, processor, _ = detector
    if params.train.freeze_encoders:
        model.freeze_encoders()
        trained, collator, train_collator = DetectorHeads(model), FeatureCollator(), FeatureCollator()
    else:
        length = params.model.max_text_length
        trained, collator = model, Collator(tokenizer, processor, length)
        train_collator = Collator(tokenizer, processor, length, caption_dropout=params.train.caption_dropout)
    return DetectorTrainer(
        model=trained,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=collator,
        train_collator=train_collator,
        compute_metrics=functools.partial(compute_metrics, class_names=class_names),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def epoch_history(log_history: list[dict]) -> list[dict]:
    """Each epoch's validation scores from the Trainer's log, without timings (the same params on the same
    machine give identical files) and without the final evaluation, which repeats the best epoch."""
    history = [
        {
            "epoch": h["epoch"],
            **{k[5:]: v for k, v in h.items() if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))},
        }
        for h in log_history
        if "eval_loss" in h
    ]
    return history[:-1]


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


def per_process_batch(batch_size: int, processes: int) -> int:
    """train.batch_size is the global batch (the paper's 256): each of the launched processes takes its share,
    so an optimizer step sees the same number of samples however many processes run."""
    if batch_size % processes:
        raise ParamsError(
            f"train.batch_size: {batch_size} is the global batch and must divide evenly over the "
            f"{processes} processes launched; use a multiple of {processes}"
        )
    return batch_size // processes


def _feature_splits(params, features_dir: Path | None, pseudo_dir: Path | None):
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
    holds them. Logs only while ``active`` and only on rank 0 (its run is the active one)."""

    def __init__(self):
        self.active = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.active and state.is_world_process_zero and logs):
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


def trainer_settings(args: TrainingArguments, processes: int) -> dict:
    """The Trainer's settings that params.yaml does not set, as params of the run (the rest of its arguments
    follow from params.yaml or do not change the model)."""
    return {
        "trainer.optim": args.optim.value,
        "trainer.lr_scheduler_type": args.lr_scheduler_type.value,
        "trainer.adam_beta1": args.adam_beta1,
        "trainer.adam_beta2": args.adam_beta2,
        "trainer.adam_epsilon": args.adam_epsilon,
        "trainer.max_grad_norm": args.max_grad_norm,
        "trainer.per_device_batch_size": args.per_device_train_batch_size,
        "trainer.processes": processes,
        "trainer.bf16": args.bf16,
    }


def log_inputs(data, paths: Paths, pseudo_dir: Path | None) -> None:
    """The data the model learns from, as MLflow datasets of the run: the prepared train and validation splits
    and, for retrain, the pseudo-labelled additions."""
    log_data(paths.data, data, {"train": "training", "validation": "validation"})
    if pseudo_dir is not None:
        log_data(pseudo_dir, open_dataset(pseudo_dir), {"train": "training", "validation": "validation"})


class DetectorTrainer(Trainer):
    """The Trainer with its own collator for the training loader: caption dropout never reaches validation."""

    def __init__(self, *args, train_collator, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_collator = train_collator

    def get_train_dataloader(self):
        eval_collator, self.data_collator = self.data_collator, self.train_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = eval_collator


def drop_class(ds, class_names, name: str):
    """Rows whose Label_B is not ``name`` (leave-one-generator-out)."""
    if name not in class_names:
        raise DataError(f"train.holdout={name!r} is not a class of the prepared data ({', '.join(class_names)})")
    k = list(class_names).index(name)
    return ds.select(np.flatnonzero(np.asarray(ds["Label_B"]) != k))


CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def checkpoint_files(processes: int = 1) -> tuple[str, ...]:
    """What a complete checkpoint holds; under a multi-process launch each rank saves its own RNG state."""
    if processes == 1:
        return CHECKPOINT_FILES
    return (*CHECKPOINT_FILES[:-1], *(f"rng_state_{rank}.pth" for rank in range(processes)))


def last_complete_checkpoint(directory: Path, processes: int = 1) -> Path | None:
    """The newest checkpoint with every file written; one cut short by a kill is removed."""
    found = sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for candidate in reversed(found):
        if all((candidate / name).is_file() for name in checkpoint_files(processes)):
            return candidate
        log.warning("removing incomplete checkpoint %s", candidate)
        shutil.rmtree(candidate, ignore_errors=True)
    return None


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


def _best_epoch(history: list[dict]) -> float:
    return max(history, key=lambda h: h[BEST_METRIC])["epoch"] if history else 0.0
