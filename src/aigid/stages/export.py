"""The `export` stage: the retrained detector as a portable one (:mod:`aigid.serving.portable`), checked before it is
written.

torch.onnx's exporter traces the detector's forward pass on raw inputs, with the batch and the caption
length dynamic, into ``model.onnx`` and its weights into ``model.onnx.data``; the detector's config,
tokenizer and image processor files are copied beside them. Two checks on a sample of the test split
(``CHECK_ROWS`` rows drawn with ``seed``, scored in batches with a progress bar: a parity check needs a sample,
not the whole split, and on a real CLIP every row costs two or three forward passes):

- the graph: onnxruntime and torch fed the very same inputs (the sample's first batch) give the same logits
  (within ``GRAPH_TOLERANCE``); a graph that does not is an error and nothing is written;
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

PARAMS = ("seed", "compute")
CHECK_ROWS = 32  # rows of the test split both checks score, a seeded sample
CHECK_BATCH = 8  # rows per batch of the checks' passes
GRAPH_TOLERANCE = 1e-3  # largest logit difference between onnxruntime and torch on the same inputs


@dataclass(frozen=True)
class Paths:
    model: Path = stage.path("models/retrained", "Detector directory written by train or retrain.", exists=True)
    data: Path = stage.path(
        "data/prepared", "Prepared dataset; a sample of its test split checks the export.", exists=True
    )
    out: Path = stage.path(
        "models/portable",
        "Portable detector directory (ONNX graph and weights, config, "
        "tokenizer, processor), for `aigid detect --model`.",
    )
    report: Path = stage.path("reports/export.json", "The checks: logit and P(AI) differences, label agreement.")


def run(params, paths: Paths) -> dict:
    """Export the detector to ONNX and check it against the torch detector on a seeded sample of the test split."""
    configure(params.compute)
    detector = load_detector(paths.model, "fp32")
    rows = check_rows(paths.data, params.seed)
    images = [r["Image"]["bytes"] for r in rows]
    captions = [r["Caption"] or "" for r in rows]
    reference_a, reference_b = predict_logits(detector, rows, RunOptions(batch_size=CHECK_BATCH, progress=True))
    with atomic_path(paths.out) as tmp:
        tmp.mkdir()
        for file in sorted(paths.model.iterdir()):
            if file.is_file() and file.name != "model.safetensors":
                shutil.copy2(file, tmp / file.name)
        prepare = Inputs(paths.model)  # images decoded as the torch detector's collator decodes them
        inputs = prepare([decode_rgb(b, side=prepare.preprocess.side) for b in images], captions)
        log.info("tracing %s into ONNX", paths.model)
        write_graph(detector.model, {name: value[:2] for name, value in inputs.items()}, tmp)
        logits, graph = _graph_check(detector.model, PortableDetector(tmp), inputs)
        if graph > GRAPH_TOLERANCE:
            raise DataError(
                f"{paths.model}: the exported graph's logits differ from torch's by {graph:.2e} "
                f"(more than {GRAPH_TOLERANCE:g}) on the same inputs; nothing written"
            )
        ours, theirs = decide(*logits), decide(reference_a, reference_b)
    report = {
        "rows": len(rows),
        "graph_rows": min(CHECK_BATCH, len(rows)),
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


def check_rows(data: Path, seed: int) -> list[dict]:
    """``CHECK_ROWS`` rows of ``data``'s test split (all of them when fewer), drawn with ``seed``, in split order."""
    splits = open_dataset(data)
    if "test" not in splits:
        raise DataError(f"{data}: no test split (splits: {', '.join(splits)}); the export check scores its rows")
    test = splits["test"]
    if len(test) < 2:
        raise DataError(f"{data}: the test split has {len(test)} row(s); the export check needs 2 at least")
    picked = np.random.default_rng(seed).choice(len(test), size=min(CHECK_ROWS, len(test)), replace=False)
    return [test[int(i)] for i in np.sort(picked)]


@torch.inference_mode()
def _graph_check(model: Detector, portable: PortableDetector, inputs: dict[str, np.ndarray]):
    """The graph's logits on ``inputs`` (batches of ``CHECK_BATCH``) and their largest difference from torch's on
    the very same inputs of the first batch (the graph's arithmetic, which no row changes: one batch checks it)."""
    from tqdm import tqdm

    logits = [[], []]
    for start in tqdm(range(0, len(inputs["pixel_values"]), CHECK_BATCH), desc="checking the graph", unit="batch"):
        graph = portable.session.run(list(OUTPUTS), {k: v[start : start + CHECK_BATCH] for k, v in inputs.items()})
        for kept, value in zip(logits, graph):
            kept.append(value)
    first = {name: torch.from_numpy(inputs[name][:CHECK_BATCH]) for name in INPUTS}
    ours = raw_scoring(model).eval()(*first.values())
    return [np.concatenate(kept) for kept in logits], max(
        float(np.abs(kept[0] - value.numpy()).max()) for kept, value in zip(logits, ours)
    )


command = stage.command("export", run, Paths, PARAMS)
