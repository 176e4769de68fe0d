"""The model card of a registered detector, in the Hugging Face convention: YAML metadata (``model-index`` with
the test metrics), then sections a reader needs before trusting a score.

`evaluate` writes it to ``reports/model_card.md`` and registers it with the model (the ``README.md`` beside the
weights and the version's description); `aigid register` registers the same file. Everything in it comes from
the evaluate report, the model's ``scoring.json`` and ``config.json``, and the prepared data's DVC hash.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from aigid.detector.scores import DEMO_NOTICE, SCORING_FILE

LIMITS = (
    "It sees one image and its caption: the caption is part of the evidence (see the scores without captions "
    "above), so a caption that does not describe the image, or none, changes the score.",
    "It knows the generators it was trained on; images from other generators, or from newer versions of these, "
    "may be called real (the unseen-generator result, where measured, says how often).",
    "P(AI) is calibrated on the validation split of the training data; on images unlike them (other sources, "
    "heavy editing, screenshots, re-compression) it is not, and the verdict's error rates do not hold.",
)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _metadata(name: str, source: str, result: dict) -> str:
    a, b = result["task_a"], result["task_b"]
    dataset = {"name": source, "type": source, "split": "test"}

    def task(title: str, metrics: list[tuple[str, str, float]]) -> dict:
        return {
            "task": {"type": "image-classification", "name": title},
            "dataset": dict(dataset),  # a copy each: no YAML anchors in the card
            "metrics": [{"type": kind, "name": label, "value": round(float(v), 6)} for kind, label, v in metrics],
        }

    meta = {
        "library_name": "aigid",
        "pipeline_tag": "image-classification",
        "tags": ["ai-generated-image-detection", "multimodal", "clip", "bert"],
        "model-index": [
            {
                "name": name,
                "results": [
                    task(
                        "Task A: real or AI-generated",
                        [
                            ("f1", "weighted F1", a["f1_weighted"]),
                            ("balanced_accuracy", "balanced accuracy", a["balanced_accuracy"]),
                            ("roc_auc", "ROC AUC", result["roc_auc"]),
                        ],
                    ),
                    task(
                        "Task B: which generator",
                        [
                            ("f1", "weighted F1", b["f1_weighted"]),
                            ("f1", "macro F1", b["f1_macro"]),
                            ("balanced_accuracy", "balanced accuracy", b["balanced_accuracy"]),
                        ],
                    ),
                ],
            }
        ],
    }
    if source != "demo" and not Path(source).exists():
        meta["datasets"] = [source]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_num(v) for v in row) + " |" for row in rows]


def _against_base(comparison: dict) -> list[str]:
    """The retrained model beside the base one (pseudo-labelled additions against none), with the difference's
    bootstrap interval: an interval wholly below 0 means retraining hurt on this test split."""
    level = f"{100 * comparison['confidence']:g}%"
    rows = [
        (metric, m["base"], m["retrained"], m["difference"], f"[{_num(m['ci_low'])}, {_num(m['ci_high'])}]")
        for metric, m in comparison["metrics"].items()
    ]
    return [
        "## Retrained against base (test split)",
        "",
        f"The base model (labelled data only) and this one (retrained with pseudo-labels) on the same test rows; "
        f"difference = retrained - base, with its {level} interval from a paired bootstrap of the rows "
        f"({comparison['rounds']} resamples, seed {comparison['seed']}). An interval below 0: retraining hurt.",
        "",
        *_table(("metric", "base", "retrained", "difference", f"{level} interval"), rows),
        "",
    ]


def model_card(
    name: str, model_dir: Path, result: dict, data_digest: str, test_rows: int, comparison: dict | None = None
) -> str:
    """The card of the detector in ``model_dir`` from its evaluate result (``report[<model>]``) and, where given,
    its comparison with the base model it was retrained from (the report's ``retrained_vs_base``)."""
    scoring = json.loads((Path(model_dir) / SCORING_FILE).read_text())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    trained_on = scoring["trained_on"]
    lines = [
        f"# {name}",
        "",
        "Detects AI-generated images and names the generator: a BERT caption encoder and a CLIP image encoder, "
        f"features fused ({config['fusion']}), two heads (Task A real/AI, Task B the class). "
        f"Classes: {', '.join(config['class_names'])}.",
        "",
    ]
    if trained_on.get("synthetic"):
        lines += [f"**Warning: {DEMO_NOTICE}.**", ""]
    lines += [*_training_data(trained_on, data_digest, test_rows), *_results(result), *_verdict(result)]
    if comparison is not None:
        lines += _against_base(comparison)
    lines += [*_controls(result), *_limits(config, trained_on)]
    return _metadata(name, trained_on["source"], result) + "\n" + "\n".join(lines)


def _training_data(trained_on: dict, data_digest: str, test_rows: int) -> list[str]:
    return [
        "## Training data",
        "",
        f"- Source: `{trained_on['source']}`; prepared data's DVC hash `{data_digest}`.",
        f"- Rows: {trained_on['rows']['train']} train, {trained_on['rows']['validation']} validation "
        f"(pseudo-labelled additions included); {test_rows} test.",
        "- Training params: "
        + ", ".join(f"`{k}={v}`" for k, v in sorted(trained_on["params"].items()) if not k.startswith("train.num")),
        "",
    ]


def _results(result: dict) -> list[str]:
    return [
        "## Results on the test split (labels at P(AI) 0.5)",
        "",
        *_table(
            ("task", "weighted F1", "macro F1", "balanced accuracy"),
            [
                (t, result[k]["f1_weighted"], result[k]["f1_macro"], result[k]["balanced_accuracy"])
                for t, k in (("A: real/AI", "task_a"), ("B: class", "task_b"))
            ],
        ),
        "",
        f"ROC AUC {_num(result['roc_auc'])}. Without captions: Task A weighted F1 "
        f"{_num(result['captions']['without']['task_a_f1_weighted'])}.",
        "",
        "Per class: Task A recall (for a generator, its detection rate) and Task B recall.",
        "",
        *_table(
            ("class", "images", "Task A recall", "Task B recall"),
            [(c, r["n"], r["task_a_recall"], r["task_b_recall"]) for c, r in result["per_class"].items()],
        ),
        "",
    ]


def _verdict(result: dict) -> list[str]:
    cal, verdict = result["calibration"], result["verdict"]
    return [
        "## Calibration and verdict",
        "",
        f"P(AI) is calibrated by temperature scaling on validation (T = {_num(cal['temperature'])}): expected "
        f"calibration error on test {_num(cal['ece_uncalibrated'])} before, {_num(cal['ece'])} after.",
        "",
        f"Verdict: `ai` at P(AI) >= {_num(verdict['threshold'])} (at most {verdict['target_fpr']:g} of real "
        f"validation images), `real` below {_num(verdict['lower'])} (at most {verdict['target_fnr']:g} of AI "
        "validation images), `unsure` between.",
        "",
        *_table(
            ("split", "decided", "accuracy of decided", "real called AI", "AI called real"),
            [
                tuple(
                    [s] + [verdict[f"{s}_{k}"] for k in ("coverage", "accuracy_decided", "fpr_verdict", "fnr_verdict")]
                )
                for s in ("validation", "test")
            ],
        ),
        "",
        "## Robustness (test split, Task A weighted F1)",
        "",
        *_table(
            ("condition", "Task A F1", "Task B F1"),
            [(c, r["task_a_f1_weighted"], r["task_b_f1_weighted"]) for c, r in result["robustness"].items()],
        ),
        "",
    ]


def _controls(result: dict) -> list[str]:
    fc = result["format_control"]
    lines = [
        f"Format control: every test image re-encoded as JPEG at quality {fc['jpeg_quality']}: Task A weighted F1 "
        f"{_num(fc['task_a']['f1_weighted'])} (clean: {_num(result['task_a']['f1_weighted'])}).",
        "",
    ]
    if "unseen_generator" in result:
        u = result["unseen_generator"]
        lines += [
            f"Unseen generator: `{u['name']}`, never trained on, detected in {_num(u['detection_rate'])} "
            f"of {u['n']} test images.",
            "",
        ]
    return lines


def _limits(config: dict, trained_on: dict) -> list[str]:
    generators = ", ".join(config["class_names"][1:])
    first = (
        DEMO_NOTICE[0].upper() + DEMO_NOTICE[1:]
        if trained_on.get("synthetic")
        else f"Trained on `{trained_on['source']}` only: real images unlike its real ones, and generators other "
        f"than {generators}, are outside what it learned"
    )
    return ["## Limits", "", f"- {first}.", *(f"- {limit}" for limit in LIMITS), ""]
