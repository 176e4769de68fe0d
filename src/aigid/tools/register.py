"""`aigid register`: register the current ``models/retrained`` in the tracking store unless it holds it already.

For a store that lacks it: a fresh clone whose `evaluate` DVC skipped, a second machine after ``dvc pull``, a
shared server. What "holds it already" means, and what a registration tags, is :mod:`aigid.serving.registry`'s.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from aigid.core import stage
from aigid.core.data import open_dataset
from aigid.serving.registry import Extras, find_version, identity, log_report, register_new
from aigid.tracking.runs import log_data, open_store, stage_run

log = logging.getLogger(__name__)
PARAMS = ("mlflow",)


@dataclass(frozen=True)
class Paths:
    model: Path = stage.path("models/retrained", "Model directory to register.", exists=True)
    report: Path = stage.path(
        "reports/evaluate.json",
        "Evaluate's report: the test metrics logged with the model and the operating-point threshold it labels at.",
        exists=True,
    )
    data: Path = stage.path(
        "data/prepared", "Prepared dataset: its first test image is the input example.", exists=True
    )
    portable: Path = stage.path("models/portable", "The model's exported form, registered with it.", exists=True)
    card: Path = stage.path("reports/model_card.md", "The model card evaluate wrote.", exists=True)


def run(params, paths: Paths) -> dict:
    """Register MODEL as a version of mlflow.registered_model with the alias @candidate, unless a version
    with the same content is registered already (then nothing changes). Safe to run any number of times."""
    name = params.mlflow.registered_model
    open_store(params.mlflow.experiment)
    report = json.loads(paths.report.read_text())
    threshold = report["retrained"]["operating_point"]["threshold"]
    key = identity(paths.model, threshold)
    existing = find_version(name, key)
    if existing is not None:  # checked before a run is opened: registering nothing leaves no empty run
        log.info("%s is registered already: %s version %s", paths.model, name, existing)
        return {"version": existing, "created": False}
    data = open_dataset(paths.data)
    with stage_run("register", params):
        log_report(report)
        log_data(paths.data, data, {"test": "test"})
        extras = Extras(paths.portable, paths.card.read_text())
        version_, created = register_new(paths.model, name, threshold, data["test"], key, extras)
    return {"version": version_, "created": created}


command = stage.command("register", run, Paths, PARAMS)
