"""Training the detector with the Hugging Face Trainer: typed settings and rows in, the best model out.

:func:`train_detector` builds a fresh detector from the starting encoders, trains it (full fine-tuning, or with
``train.freeze_encoders`` the fusion layer and heads alone on cached features), evaluates every epoch, keeps
only the latest checkpoint and loads the best epoch by weighted F1 on Task A at the end (as the paper reports it;
the reference code selected by binary F1). It knows nothing of stages, paths of the pipeline or MLflow:
:mod:`aigid.training.fit` (the `train` and `retrain` stages' work) gives it the rows, a checkpoint folder and the
callbacks that log.

A run that was killed leaves its checkpoints in the folder it was given, and the next call with the same folder
resumes from the last one that is complete: transformers' ``get_last_checkpoint`` finds the newest, and a mark
this module writes after the Trainer has saved one (:class:`MarkComplete`, one per process, carrying the
folder's fingerprint) tells a complete checkpoint from one cut short.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from aigid.core.data import Collator, DataError
from aigid.core.errors import ParamsError
from aigid.detector.cache import FeatureCollator
from aigid.detector.model import DetectorHeads, build_detector

log = logging.getLogger(__name__)
BEST_METRIC = "f1_weighted_a"
# The validation scores a result keeps (f1_weighted_a, balanced_accuracy_b, ...; not loss or timings).
SCORES = ("f1", "accuracy", "precision", "recall", "balanced")
MARK = "aigid-complete-{rank}.json"  # written into a checkpoint by each process once the Trainer has saved it


@dataclass(frozen=True)
class TrainingRows:
    """What the detector learns from: train and validation rows (images and captions, or cached features with
    ``freeze_encoders``) and the class names of Label_B."""

    train: object
    validation: object
    class_names: tuple[str, ...]


@dataclass
class Trained:
    """The outcome of :func:`train_detector`: the detector (the best epoch's weights loaded), its Trainer (to
    predict with), the best epoch's validation scores and every epoch's."""

    detector: tuple
    trainer: Trainer
    metrics: dict
    history: list[dict]


def launch() -> PartialState:
    """The processes of this launch: one for a plain run; under torchrun / accelerate launch this sets up the
    process group the Trainer then uses for DistributedDataParallel. Without CUDA, accelerate makes a launch
    multi-CPU (gloo) only when told to use the CPU."""
    return PartialState(cpu=launch_on_cpu())


def launch_on_cpu() -> bool:
    """A multi-process launch on a machine without CUDA."""
    return not torch.cuda.is_available() and torch.distributed.is_torchelastic_launched()


def per_process_batch(batch_size: int, processes: int) -> int:
    """train.batch_size is the global batch (the paper's 256): each of the launched processes takes its share,
    so an optimizer step sees the same number of samples however many processes run."""
    if batch_size % processes:
        raise ParamsError(
            f"train.batch_size: {batch_size} is the global batch and must divide evenly over the "
            f"{processes} processes launched; use a multiple of {processes}"
        )
    return batch_size // processes


def training_arguments(train, seed: int, run_name: str, checkpoints: Path, state: PartialState) -> TrainingArguments:
    """The Trainer's arguments: ``train`` (params.yaml's group) and the seed, an evaluation and a checkpoint per
    epoch, the best epoch by weighted Task A F1 loaded at the end."""
    batch_size = per_process_batch(train.batch_size, state.num_processes)
    return TrainingArguments(
        output_dir=str(checkpoints),
        run_name=run_name,
        report_to="none",
        seed=seed,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of all steps
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        num_train_epochs=train.epochs,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model=BEST_METRIC,
        greater_is_better=True,
        remove_unused_columns=False,
        label_names=["labels_a", "labels_b"],
        dataloader_num_workers=train.num_workers,
        dataloader_persistent_workers=train.num_workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        use_cpu=launch_on_cpu(),
        ddp_find_unused_parameters=False,
        disable_tqdm=not sys.stderr.isatty(),  # the steps' bar on a terminal; logs stay one line per epoch
    )


def trainer_settings(args: TrainingArguments, processes: int) -> dict:
    """The Trainer's settings that params.yaml does not set, as params of a run (the rest of its arguments follow
    from params.yaml or do not change the model)."""
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


def train_detector(
    encoders: Path,
    rows: TrainingRows,
    model,
    train,
    args: TrainingArguments,
    fingerprint: str,
    compute_metrics: Callable,
    callbacks: Sequence[TrainerCallback] = (),
) -> Trained:
    """Train a fresh detector from ``encoders`` (``text/`` and ``vision/``) on ``rows`` with ``model`` and
    ``train`` (params.yaml's groups) and the Trainer's ``args``; resume from the last complete checkpoint in
    ``args.output_dir`` when it carries ``fingerprint``. ``compute_metrics`` maps the Trainer's predictions on
    the validation rows to scores; ``callbacks`` see the training (they log)."""
    state = launch()
    checkpoints = Path(args.output_dir)
    # Rank 0 picks (and cleans) the checkpoint to resume from; every rank resumes from that one.
    resume = resumable_checkpoint(checkpoints, fingerprint, state.num_processes) if state.is_main_process else None
    resume = broadcast_object_list([resume])[0]
    if resume and state.is_main_process:
        log.info("resuming %s from the last checkpoint in %s (%s)", args.run_name, checkpoints, Path(resume).name)
    set_seed(args.seed)  # before the fusion layer and heads are initialised
    detector = build_detector(
        str(encoders / "text"),
        str(encoders / "vision"),
        model.fusion_dim,
        model.max_text_length,
        rows.class_names,
        model.fusion,
    )
    mark = MarkComplete(fingerprint, state.process_index)
    trainer = detector_trainer(detector, model, train, args, rows, compute_metrics, [*callbacks, mark])
    trainer.train(resume_from_checkpoint=resume)
    for callback in callbacks:
        trainer.remove_callback(callback)  # the evaluation below repeats the best epoch
    best = trainer.evaluate()  # the best checkpoint is loaded at this point; every rank takes part
    history = epoch_history(trainer.state.log_history)
    metrics = {
        "best_epoch": max(history, key=lambda h: h[BEST_METRIC])["epoch"] if history else 0.0,
        "train_rows": len(rows.train),
        "validation_rows": len(rows.validation),
        **{k[5:]: v for k, v in best.items() if k.startswith("eval_") and k[5:].split("_")[0] in SCORES},
    }
    return Trained(detector, trainer, metrics, history)


def detector_trainer(detector, model, train, args, rows: TrainingRows, compute_metrics, callbacks) -> Trainer:
    """The Trainer of the detector, or with ``train.freeze_encoders`` of its fusion layer and heads alone (the
    detector's own modules, updated in place) on cached features: captions were encoded once, so there is
    nothing to drop either. Caption dropout is a transform of the training rows (:class:`DropCaptions`), so the
    validation rows never see it."""
    net, tokenizer, processor, _ = detector
    train_rows = rows.train
    if train.freeze_encoders:
        net.freeze_encoders()
        trained, collator = DetectorHeads(net), FeatureCollator()
    else:
        trained, collator = net, Collator(tokenizer, processor, model.max_text_length)
        if train.caption_dropout > 0:
            train_rows = train_rows.with_transform(DropCaptions(train.caption_dropout))
    return Trainer(
        model=trained,
        args=args,
        train_dataset=train_rows,
        eval_dataset=rows.validation,
        data_collator=collator,
        compute_metrics=functools.partial(compute_metrics, class_names=rows.class_names),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


class DropCaptions:
    """A batch transform of training rows (``datasets.Dataset.with_transform``): each caption becomes "" with
    probability ``p``. The draws come from torch's global generator, which the Trainer seeds (and DataLoader
    seeds per worker from it) and saves in its checkpoints: the same seed drops the same captions, resumed or
    not. A batch of rows is read by one call, right before it is collated."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        drop = (torch.rand(len(batch["Caption"])) < self.p).tolist()
        batch["Caption"] = ["" if d else c for c, d in zip(batch["Caption"], drop)]
        return batch


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


def drop_class(ds, class_names, name: str):
    """Rows whose Label_B is not ``name`` (leave-one-generator-out)."""
    if name not in class_names:
        raise DataError(f"train.holdout={name!r} is not a class of the prepared data ({', '.join(class_names)})")
    k = list(class_names).index(name)
    return ds.select(np.flatnonzero(np.asarray(ds["Label_B"]) != k))


class MarkComplete(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has saved it (``on_save`` comes after every file of it is
    written): each process writes its own mark, with the fingerprint of what the checkpoint depends on."""

    def __init__(self, fingerprint: str, rank: int):
        self.fingerprint, self.rank = fingerprint, rank

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        (folder / MARK.format(rank=self.rank)).write_text(json.dumps({"fingerprint": self.fingerprint}))


def is_complete(checkpoint: Path, fingerprint: str, processes: int) -> bool:
    """Whether every process marked ``checkpoint`` complete, for ``fingerprint``."""
    for rank in range(processes):
        mark = checkpoint / MARK.format(rank=rank)
        try:
            if json.loads(mark.read_text()).get("fingerprint") != fingerprint:
                return False
        except (OSError, ValueError):
            return False
    return True


def resumable_checkpoint(folder: Path, fingerprint: str, processes: int = 1) -> str | None:
    """The newest checkpoint in ``folder`` (``get_last_checkpoint``) that every process completed for
    ``fingerprint``; newer ones cut short by a kill are removed."""
    while folder.is_dir() and (last := get_last_checkpoint(str(folder))):
        if is_complete(Path(last), fingerprint, processes):
            return last
        log.warning("removing incomplete checkpoint %s", last)
        shutil.rmtree(last, ignore_errors=True)
    return None
