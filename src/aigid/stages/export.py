"""The `export` stage: the retrained detector as a portable one (:mod:`aigid.serving.portable`), checked before it is
written.

torch.onnx's exporter traces the detector's forward pass on raw inputs, with the batch and the caption
length dynamic, into ``model.onnx`` and its weights into ``model.onnx.data``; the detector's config,
tokenizer and image processor files are copied beside them. Two checks on the first rows of the test split:

- the graph: onnxruntime and torch fed the very same inputs give the same logits (within ``GRAPH_TOLERANCE``);
  a graph that does not is an error and nothing is written;
- the whole path: the portable detector's P(AI), labels and generators (its own image steps and tokenizer,
  then the graph) against the torch detector's on the same encoded images (the two prepare images with
  different resizes, see :mod:`aigid.serving.portable`), written to the report.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aigid.core import stage
from aigid.core.data import decode_rgb, open_dataset
from aigid.core.errors import DataError
from aigid.core.files import atomic_path, write_json
from aigid.detector.infer import RunOptions, predict_logits
from aigid.detector.model import Detector, load_detector
from aigid.detector.runtime import configure
from aigid.detector.scores import decide
from aigid.serving.portable import (
    GRAPH,
    INPUTS,
    OPSET,
    OUTPUTS,
    WEIGHTS,
    Inputs,
    PortableDetector,
    raw_scoring,
    write_graph,
)

log = logging.getLogger(__name__)

PARAMS = ("compute",)
CHECK_ROWS = 64  # rows of the test split both checks score
GRAPH_TOLERANCE = 1e-3  # largest logit difference between onnxruntime and torch on the same inputs


@dataclass(frozen=True)
class Paths:
    model: Path = stage.path("models/retrained", "Detector directory written by train or retrain.", exists=True)
    data: Path = stage.path(
        "data/prepared", "Prepared dataset; the first rows of its test split check the export.", exists=True
    )
    out: Path = stage.path(
        "models/portable",
        "Portable detector directory (ONNX graph and weights, config, "
        "tokenizer, processor), for `aigid detect --model`.",
    )
    report: Path = stage.path("reports/export.json", "The checks: logit and P(AI) differences, label agreement.")


def run(params, paths: Paths) -> dict:
    """Export the detector to ONNX and check it against the torch detector on the test split's first rows."""
    configure(params.compute)
    detector = load_detector(paths.model, "fp32")
    splits = open_dataset(paths.data)
    if "test" not in splits:
        raise DataError(f"{paths.data}: no test split (splits: {', '.join(splits)}); the export check scores its rows")
    test = splits["test"]
    rows = [test[i] for i in range(min(CHECK_ROWS, len(test)))]
    if len(rows) < 2:
        raise DataError(f"{paths.data}: the test split has {len(rows)} row(s); the export check needs 2 at least")
    images = [r["Image"]["bytes"] for r in rows]
    captions = [r["Caption"] or "" for r in rows]
    reference_a, reference_b = predict_logits(detector, rows, RunOptions())
    with atomic_path(paths.out) as tmp:
        tmp.mkdir()
        for file in sorted(paths.model.iterdir()):
            if file.is_file() and file.name != "model.safetensors":
                shutil.copy2(file, tmp / file.name)
        prepare = Inputs(paths.model)  # images decoded as the torch detector's collator decodes them
        inputs = prepare([decode_rgb(b, side=prepare.preprocess.side) for b in images], captions)
        write_graph(detector.model, inputs, tmp)
        logits = PortableDetector(tmp).session.run(list(OUTPUTS), inputs)  # the portable path on these rows
        graph = _graph_difference(detector.model, logits, inputs)
        if graph > GRAPH_TOLERANCE:
            raise DataError(
                f"{paths.model}: the exported graph's logits differ from torch's by {graph:.2e} "
                f"(more than {GRAPH_TOLERANCE:g}) on the same inputs; nothing written"
            )
        ours, theirs = decide(*logits), decide(reference_a, reference_b)
    report = {
        "rows": len(rows),
        "graph_max_logit_difference": graph,
        "max_prob_ai_difference": float(np.abs(ours.prob_ai - theirs.prob_ai).max()),
        "label_agreement": float((ours.label_a == theirs.label_a).mean()),
        "generator_agreement": float((ours.label_b == theirs.label_b).mean()),
        "graph_bytes": (paths.out / GRAPH).stat().st_size,
        "weights_bytes": (paths.out / WEIGHTS).stat().st_size,
        "opset": OPSET,
    }
    write_json(paths.report, report)
    log.info(
        "exported %s to %s (%.1f MB): logits within %.1e of torch's; on %d test rows P(AI) within %.1e of the "
        "torch detector's, labels agree on %.1f%%",
        paths.model,
        paths.out,
        report["weights_bytes"] / 1e6,
        graph,
        len(rows),
        report["max_prob_ai_difference"],
        100 * report["label_agreement"],
    )
    return report


@torch.inference_mode()
def _graph_difference(model: Detector, logits: list[np.ndarray], inputs: dict[str, np.ndarray]) -> float:
    """The largest difference between the graph's ``logits`` and torch's on the same ``inputs``."""
    out = raw_scoring(model).eval()(*(torch.from_numpy(inputs[name]) for name in INPUTS))
    return float(max(np.abs(a - b.numpy()).max() for a, b in zip(logits, out)))


command = stage.command("export", run, Paths, PARAMS)
