"""The `evaluate` stage: base and retrained detectors on the labeled test split.

For each model: both tasks' scores (balanced ones too; labels at P(AI) 0.5), Task A ROC AUC and average precision
with their curves, the calibration of P(AI) before and after the model's temperature (ECE, reliability rows), the
model's own rule (its ``scoring.json``, fitted on validation by train/retrain): the operating point and the verdict
with its unsure band, measured on validation and test (coverage, accuracy of the decided rows), scores with every
caption blanked, a
robustness grid (JPEG, blur, resize), Task A on a format-controlled copy of the test split (every image re-encoded
as the same JPEG, per original file format) and, for a model trained with ``train.holdout``, the detection rate of
the generator it never saw.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from aigid.core import stage
from aigid.core.data import FILE_FORMATS, file_format, open_dataset
from aigid.core.errors import DataError, ParamsError, choice
from aigid.core.files import write_json, write_text
from aigid.detector.cache import Condition, predict_grid, shares_encoders
from aigid.detector.infer import RunOptions
from aigid.detector.model import Loaded, load_detector
from aigid.detector.runtime import configure
from aigid.detector.scores import SCORING_FILE, Scoring, decide
from aigid.serving.card import model_card
from aigid.serving.registry import Extras, log_report, register
from aigid.tracking.metrics import (
    COMPARISON,
    calibration,
    confusion_rows,
    curve_rows,
    headline,
    paired_bootstrap,
    ranking_scores,
    rates_at,
    score,
    verdict_scores,
)
from aigid.tracking.runs import log_data, stage_run

PARAMS = ("evaluate", "pseudolabel.pool", "train.num_workers", "inference", "compute", "mlflow")


@dataclass(frozen=True)
class Paths:
    base: Path = stage.path("models/base", "Model written by train.", exists=True)
    retrained: Path = stage.path(
        "models/retrained", "Model written by retrain; logged to MLflow and registered.", exists=True
    )
    portable: Path = stage.path(
        "models/portable", "The retrained model's exported form, registered with it.", exists=True
    )
    data: Path = stage.path(
        "data/prepared",
        "Prepared dataset holding the labeled test split (and validation, for the operating point).",
        exists=True,
    )
    metrics: Path = stage.path("metrics/evaluate.json", "Headline test scores of both models (DVC metrics).")
    report: Path = stage.path(
        "reports/evaluate.json",
        "Every test score of both models: per class, captions, robustness, the unseen generator.",
    )
    plots: Path = stage.path(
        "metrics/plots", "Directory for plot rows: confusion matrices, ROC and precision-recall curves, robustness."
    )
    card: Path = stage.path("reports/model_card.md", "The retrained model's card, registered with it.")


def run(params, paths: Paths) -> dict:
    """Score the base and retrained models on the test split: both tasks, balanced metrics, per generator,
    ROC/PR, calibration, the model's operating point and verdict, without captions, under the robustness grid.

    The retrained model is then logged to this stage's MLflow run (with its test metrics, its exported form and
    its model card) and registered as a version of mlflow.registered_model with the alias @candidate (unless
    that very model is registered already).
    """
    configure(params.compute)
    perturbations(params.evaluate)  # a bad grid stops the stage before any scoring
    models = {"base": paths.base, "retrained": paths.retrained}
    data = open_dataset(paths.data)
    with stage_run("evaluate", params):
        digest = log_data(paths.data, data, {"test": "test", "validation": "validation"})
        report, plots = evaluate(
            models,
            data,
            params.evaluate,
            contaminated=params.pseudolabel.pool == "test",
            num_workers=params.train.num_workers,
            precision=params.inference.precision,
        )
        log_report(report, parent=True)
        name = params.mlflow.registered_model
        card = model_card(name, paths.retrained, report["retrained"], digest, len(data["test"]), report.get(COMPARISON))
        threshold = report["retrained"]["operating_point"]["threshold"]
        register(paths.retrained, name, threshold, data["test"], Extras(paths.portable, card))
    write_text(paths.card, card)
    for name, rows in plots.items():
        write_json(paths.plots / f"{name}.json", rows)
    write_json(paths.report, report)
    write_json(paths.metrics, headline(report))
    return report


command = stage.command("evaluate", run, Paths, PARAMS)


def _jpeg(img: PILImage.Image, quality: float) -> PILImage.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return PILImage.open(buf).convert("RGB")


def _blur(img: PILImage.Image, sigma: float) -> PILImage.Image:
    from PIL import ImageFilter

    return img.filter(ImageFilter.GaussianBlur(radius=sigma))  # Pillow's radius is the standard deviation


def _resize(img: PILImage.Image, factor: float) -> PILImage.Image:
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, PILImage.BICUBIC)


@dataclass(frozen=True)
class Kind:
    """A kind of perturbation: the transform of a decoded RGB image at a value, which values it takes, and how
    a value reads in a condition's name (``jpeg_95``, ``resize_50``)."""

    apply: Callable[[PILImage.Image, float], PILImage.Image]
    valid: Callable[[float], bool]
    takes: str
    in_name: Callable[[float], float] = lambda value: value


# evaluate.robustness's keys; a new perturbation is one entry here (and its test), with its values in params.yaml.
PERTURBATIONS = {
    "jpeg": Kind(_jpeg, lambda q: q == int(q) and 1 <= q <= 100, "an integer from 1 to 100 (the JPEG quality)"),
    "blur": Kind(_blur, lambda s: s > 0, "a positive number (the Gaussian blur's standard deviation, pixels)"),
    "resize": Kind(_resize, lambda f: f > 0, "a positive number (both sides times it, bicubic)", lambda f: f * 100),
}


@dataclass(frozen=True)
class Perturbation:
    """One condition of the robustness grid (a kind of :data:`PERTURBATIONS` at a value), applied to a decoded
    RGB image before the image processor. A plain object, so DataLoader workers can receive it."""

    kind: str
    value: float

    @property
    def name(self) -> str:
        """Metric-key friendly: jpeg_95, blur_1, resize_50 (percent of the original size)."""
        return f"{self.kind}_{PERTURBATIONS[self.kind].in_name(self.value):g}".replace(".", "p")

    def __call__(self, img: PILImage.Image) -> PILImage.Image:
        return PERTURBATIONS[self.kind].apply(img, self.value)


def perturbations(params) -> list[Perturbation]:
    """The robustness grid of ``evaluate.robustness``, in params order; a kind or a value it does not take is a
    ParamsError naming its key."""
    grid = []
    for kind, values in params.robustness.items():
        spec = choice(PERTURBATIONS, kind, "evaluate.robustness")
        for i, value in enumerate(values):
            if not spec.valid(value):
                raise ParamsError(f"evaluate.robustness.{kind}[{i}]: must be {spec.takes}, got {value:g}")
            grid.append(Perturbation(kind, value))
    return grid


def evaluate_model(
    model_dir: Path, model, rule: Scoring, data, params, grid: dict, val_logits: tuple
) -> tuple[dict, dict]:
    """The scores of one model (its :func:`load_rule`) from its logits on the test split under each condition of
    :func:`conditions` (``grid[condition]``) and on the validation rows its rule was fitted on."""
    names = tuple(model.config.class_names)
    test, validation = data["test"], data["validation"]
    labels_a, labels_b = np.asarray(test["Label_A"]), np.asarray(test["Label_B"])

    def predict(condition: str):  # labels at P(AI) 0.5, where the temperature changes none
        return rule.decide(*grid[condition], threshold=0.5)

    def scores(pred) -> dict:
        return score(labels_a, labels_b, pred.label_a, pred.label_b, names)

    test_logits = grid[CLEAN]
    pred = predict(CLEAN)
    prob_ai = pred.prob_ai
    result = {**scores(pred), **ranking_scores(labels_a, prob_ai)}
    result["calibration"], reliability = calibration(labels_a, prob_ai)
    uncalibrated, raw_reliability = calibration(labels_a, decide(*test_logits).prob_ai)
    result["calibration"].update(temperature=rule.temperature, ece_uncalibrated=uncalibrated["ece"])
    plots = {
        "confusion_a": confusion_rows(labels_a, pred.label_a, ("real", "ai")),
        "confusion_b": confusion_rows(labels_b, pred.label_b, names),
        **curve_rows(labels_a, prob_ai),
        "reliability": reliability,
        "reliability_uncalibrated": raw_reliability,
    }
    fitted_on = _without(validation, names, getattr(model.config, "holdout", "none"))  # as train fitted the rule
    result["operating_point"], result["verdict"] = model_rule(model_dir, rule, val_logits, fitted_on, test_logits, test)

    blank = predict(BLANK)
    result["captions"] = {
        "with": _summary(result),
        "without": {**_summary(scores(blank)), **ranking_scores(labels_a, blank.prob_ai)},
    }
    result["captions"]["with"].update(roc_auc=result["roc_auc"], average_precision=result["average_precision"])

    quality = params.format_control_quality
    result["format_control"] = format_control(test, pred, predict(FORMAT_CONTROL), quality, names)

    robustness = {"clean": _condition(result)}
    for perturb in perturbations(params):
        robustness[perturb.name] = _condition(scores(predict(perturb.name)))
    result["robustness"] = robustness
    plots.update(robustness_plots(robustness))

    holdout = getattr(model.config, "holdout", "none")
    if holdout != "none":
        seen = result["per_class"].get(holdout, {"n": 0, "task_a_recall": None})
        result["unseen_generator"] = {"name": holdout, "n": seen["n"], "detection_rate": seen["task_a_recall"]}
    return result, plots


def robustness_plots(robustness: dict) -> dict[str, list[dict]]:
    """The plot rows of the robustness grid: both tasks' F1 per condition, the detection rate per class."""
    return {
        "robustness": [
            {"condition": c, "f1_a": r["task_a_f1_weighted"], "f1_b": r["task_b_f1_weighted"]}
            for c, r in robustness.items()
        ],
        "robustness_per_class": [
            {"case": f"{c} / {g}", "condition": c, "class": g, "detection_rate": rate}
            for c, r in robustness.items()
            for g, rate in r["per_class"].items()
        ],
    }


def load_rule(model_dir: Path) -> Scoring:
    rule = Scoring.load(model_dir)
    if not rule.fitted:
        raise DataError(f"{model_dir}: no {SCORING_FILE}; a model written by this version of train/retrain has one")
    return rule


# The test split's conditions besides the robustness grid's (named by their perturbation).
CLEAN, BLANK, FORMAT_CONTROL = "clean", "captions_blank", "format_control"


def conditions(params) -> list[Condition]:
    """Every way evaluate shows the test split to a model: as stored, captions blanked, the format-controlled
    copy, then the robustness grid."""
    return [
        Condition(CLEAN),
        Condition(BLANK, blank=True),
        Condition(FORMAT_CONTROL, Perturbation("jpeg", params.format_control_quality)),
        *(Condition(p.name, p) for p in perturbations(params)),
    ]


def encoder_groups(detectors: dict[str, Loaded]) -> list[list[str]]:
    """The models in groups that share their encoders (:func:`aigid.detector.cache.shares_encoders`), in order."""
    groups: list[list[str]] = []
    for name, detector in detectors.items():
        group = next((g for g in groups if shares_encoders(detectors[g[0]], detector)), None)
        group.append(name) if group is not None else groups.append([name])
    return groups


def _without(ds, names: tuple[str, ...], holdout: str):
    """The rows of ``ds`` but those of the held-out generator (``none``: all)."""
    if holdout == "none":
        return ds
    return ds.select(np.flatnonzero(np.asarray(ds["Label_B"]) != names.index(holdout)))


def model_rule(model_dir: Path, rule: Scoring, val_logits, validation, test_logits, test) -> tuple[dict, dict]:
    """The model's operating point and verdict, as fitted on validation (its scoring.json) and measured on
    validation (the rows it was fitted on: a held-out generator's left out) and test: at the threshold, the
    true- and false-positive rates; with the unsure band, the share of rows decided and how many of those are
    right."""
    fitted = json.loads((model_dir / SCORING_FILE).read_text())["verdict"]
    out = {}
    for split, ds, split_logits in (("validation", validation, val_logits), ("test", test, test_logits)):
        labels_a, d = np.asarray(ds["Label_A"]), rule.decide(*split_logits)
        out[split] = {**rates_at(labels_a, d.prob_ai, rule.threshold), **verdict_scores(labels_a, d.verdict)}
    operating_point = {"target_fpr": fitted["target_fpr"], "threshold": rule.threshold}
    operating_point.update({f"{split}_{k}": out[split][k] for split in out for k in ("tpr", "fpr")})
    verdict = {k: fitted[k] for k in ("threshold", "lower", "target_fpr", "target_fnr")}
    verdict.update({f"{split}_{k}": v for split in out for k, v in out[split].items() if k not in ("tpr", "fpr")})
    return operating_point, verdict


def format_control(test, clean, controlled, quality: int, names: tuple[str, ...]) -> dict:
    """Task A on the test split as stored (``clean``) and with every image re-encoded as JPEG at ``quality``
    (``controlled``), overall and per original file format: a detector that learned the file format (say,
    "JPEG = real") calls originally-PNG real images AI, or originally-JPEG AI images real, and loses that once
    every image is a JPEG of the same quality."""
    labels_a, labels_b = np.asarray(test["Label_A"]), np.asarray(test["Label_B"])
    formats = np.array(
        [file_format(row["bytes"]) for start in range(0, len(test), 512) for row in test[start : start + 512]["Image"]]
    )
    s = score(labels_a, labels_b, controlled.label_a, controlled.label_b, names)
    out = {
        "jpeg_quality": quality,
        "task_a": {k: s["task_a"][k] for k in ("f1_weighted", "balanced_accuracy", "f1_binary")},
        "per_class": {name: c["task_a_recall"] for name, c in s["per_class"].items()},
        "by_original_format": {},
    }
    for kind in FILE_FORMATS:
        for label, name in ((0, "real"), (1, "ai")):
            rows = (formats == kind) & (labels_a == label)
            if rows.any():  # share of these images called what they are (Task A recall), before and after
                out["by_original_format"].setdefault(kind, {})[name] = {
                    "n": int(rows.sum()),
                    "clean_recall": float((clean.label_a[rows] == label).mean()),
                    "controlled_recall": float((controlled.label_a[rows] == label).mean()),
                }
    return out


def _summary(s: dict) -> dict:
    return {
        "task_a_f1_weighted": s["task_a"]["f1_weighted"],
        "task_a_balanced_accuracy": s["task_a"]["balanced_accuracy"],
        "task_b_f1_weighted": s["task_b"]["f1_weighted"],
    }


def _condition(s: dict) -> dict:
    """One robustness condition: both weighted F1s and each class's Task A recall (its detection rate)."""
    return {
        "task_a_f1_weighted": s["task_a"]["f1_weighted"],
        "task_b_f1_weighted": s["task_b"]["f1_weighted"],
        "per_class": {name: c["task_a_recall"] for name, c in s["per_class"].items()},
    }


def evaluate(
    models: dict[str, Path], data, params, contaminated: bool, num_workers: int = 0, precision: str = "auto"
) -> tuple[dict, dict]:
    """Scores of each named model on the test split of ``data`` (the prepared DatasetDict), and rows for the
    plots (confusion, ROC, PR, robustness).

    Every condition of the test split is scored in one pass per group of models that share their encoders
    (frozen-encoder training: base and retrained): the encoders run once per row and condition for the group,
    each model's heads read their features (:func:`aigid.detector.cache.predict_grid`)."""
    metrics: dict = {"test_rows": len(data["test"]), "contaminated": contaminated}
    detectors = {name: load_detector(path, precision) for name, path in models.items()}
    rules = {name: load_rule(path) for name, path in models.items()}
    grid, validation = {}, {}
    options = RunOptions(params.batch_size, num_workers, progress=True)
    test_conditions = conditions(params)
    for group in encoder_groups(detectors):
        members = {name: detectors[name] for name in group}
        scored = predict_grid(
            members,
            data["test"],
            test_conditions,
            options,
            f"test: {len(test_conditions)} conditions, {' + '.join(group)}",
        )
        for name in group:
            grid[name] = {condition: scored[condition][name] for condition in scored}
        # The validation rows each model's rule was fitted on (a held-out generator's left out).
        for holdout in dict.fromkeys(getattr(detectors[name].model.config, "holdout", "none") for name in group):
            of = [name for name in group if getattr(detectors[name].model.config, "holdout", "none") == holdout]
            names = tuple(detectors[of[0]].model.config.class_names)
            rows = _without(data["validation"], names, holdout)
            scored = predict_grid({n: detectors[n] for n in of}, rows, [Condition(CLEAN)], options, "validation")
            validation.update({name: scored[CLEAN][name] for name in of})
    plots = {}
    for name, path in models.items():
        model = detectors[name].model
        metrics[name], model_plots = evaluate_model(
            path, model, rules[name], data, params, grid[name], validation[name]
        )
        plots.update({f"{key}_{name}": rows for key, rows in model_plots.items()})
    if {"base", "retrained"} <= set(models):
        test = data["test"]
        pred = {name: rules[name].decide(*grid[name][CLEAN], threshold=0.5) for name in ("base", "retrained")}
        metrics[COMPARISON] = paired_bootstrap(
            test["Label_A"],
            test["Label_B"],
            *((p.prob_ai, p.label_a, p.label_b) for p in pred.values()),
            len(detectors["base"].model.config.class_names),
        )
    return metrics, plots
