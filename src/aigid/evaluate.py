"""The `evaluate` stage: base and retrained detectors on the labeled test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import open_dataset
from .infer import predict_logits
from .metrics import confusion_rows, score
from .model import decide, load_detector


def evaluate_model(model_dir: Path, test, batch_size: int, num_workers: int = 0) -> tuple[dict, dict]:
    model, tokenizer, processor = load_detector(model_dir)
    logits_a, logits_b = predict_logits(model, tokenizer, processor, test, batch_size, num_workers)
    pred = decide(torch.from_numpy(logits_a), torch.from_numpy(logits_b))
    labels_a, labels_b = np.asarray(test["Label_A"]), np.asarray(test["Label_B"])
    pa, pb = pred.label_a.numpy(), pred.label_b.numpy()
    names = tuple(model.config.class_names)
    result = score(labels_a, labels_b, pa, pb, names)
    plots = {"confusion_a": confusion_rows(labels_a, pa, ("real", "ai")),
             "confusion_b": confusion_rows(labels_b, pb, names)}
    return result, plots


def evaluate(models: dict[str, Path], data_dir: Path, batch_size: int, contaminated: bool,
             num_workers: int = 0) -> tuple[dict, dict]:
    """Scores of each named model on the test split, and rows for the confusion plots."""
    test = open_dataset(data_dir)["test"]
    metrics: dict = {"test_rows": len(test), "contaminated": contaminated}
    plots = {}
    for name, path in models.items():
        metrics[name], model_plots = evaluate_model(path, test, batch_size, num_workers)
        plots.update({f"{key}_{name}": rows for key, rows in model_plots.items()})
    return metrics, plots
