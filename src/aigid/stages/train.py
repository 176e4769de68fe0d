"""The `train` stage: fine-tune the detector on the prepared data in an MLflow run (:mod:`aigid.training.fit`).

The best model goes to ``models/base`` with its ``scoring.json`` (calibrated P(AI), the verdict's thresholds);
its headline validation metrics, every metric and the per-epoch curves go to the metrics, report and history
files. Checkpoints live in ``checkpoints/train/<fingerprint>`` until the stage completes: a run that was killed
resumes from the last complete one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aigid.core import stage
from aigid.training.fit import PARAMS, TrainingPaths, train_and_write


@dataclass(frozen=True)
class Paths(TrainingPaths):
    out: Path = stage.path(
        "models/base", "Directory for the best model (self-contained: weights, configs, tokenizer, processor)."
    )
    metrics: Path = stage.path(
        "metrics/train.json", "Headline validation metrics of the best checkpoint (DVC metrics)."
    )
    report: Path = stage.path("reports/train.json", "Every validation metric of the best checkpoint.")
    history: Path = stage.path("metrics/train_history.json", "Per-epoch validation metrics (a DVC plot).")


def run(params, paths: Paths) -> dict:
    """Train the detector on the prepared train split (Trainer; best checkpoint by weighted F1 on Task A)."""
    return train_and_write(params, paths, "train")


command = stage.command("train", run, Paths, PARAMS)
