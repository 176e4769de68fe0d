"""The `retrain` stage: a fresh detector from the same encoders, on the original plus pseudo-labelled data.

It trains as `train` does (:mod:`aigid.training.fit`), with the pseudo-labelled train/validation additions, and
reads ``pseudolabel.pool`` (in frozen-encoder mode their features are looked up in that split's cached features).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aigid.core import stage
from aigid.training import fit

PARAMS = (*fit.PARAMS, "pseudolabel.pool")


@dataclass(frozen=True)
class Paths(fit.TrainingPaths):
    out: Path = stage.path(
        "models/retrained", "Directory for the best model (self-contained: weights, configs, tokenizer, processor)."
    )
    metrics: Path = stage.path(
        "metrics/retrain.json",
        "Headline validation metrics of the best checkpoint "
        "(DVC metrics; the validation set includes pseudo-labelled images).",
    )
    report: Path = stage.path("reports/retrain.json", "Every validation metric of the best checkpoint.")
    history: Path = stage.path("metrics/retrain_history.json", "Per-epoch validation metrics (a DVC plot).")
    pseudo: Path = stage.path(
        "data/pseudolabel", "Train/validation additions written by the pseudolabel stage.", exists=True
    )


def run(params, paths: Paths) -> dict:
    """Train a fresh detector from the same encoders on the original plus pseudo-labelled data."""
    return fit.train_and_write(params, paths, "retrain", paths.pseudo)


command = stage.command("retrain", run, Paths, PARAMS)
