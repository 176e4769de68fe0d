"""Batched inference, the one path used by features, pseudolabel, evaluate, detect and the registered model.

Rows are read from memory-mapped Arrow by a DataLoader whose worker processes decode, resize and tokenise
(:class:`~aigid.core.data.Collator`); the main process only moves batches to the device and runs the model. Rows
are visited grouped by caption, so the images of one caption share a batch and BERT reads each caption once
(:meth:`~aigid.detector.model.Detector.encode`); results come back in the dataset's order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from aigid.core.data import Collator
from aigid.detector.model import Loaded
from aigid.detector.runtime import autocast, device
from aigid.detector.scores import Scoring, score_rows

# The rows scored: a `datasets.Dataset` (memory-mapped Arrow, the stages) or a list of row dicts with the same
# columns (detect, which so never imports `datasets`).
Rows = Sequence[dict]


def caption_order(dataset: Rows) -> np.ndarray:
    """Row indices grouped by caption (stable), or the identity where captions carry no id."""
    if "caption_id" not in getattr(dataset, "column_names", ()):
        return np.arange(len(dataset))
    return np.argsort(np.asarray(dataset["caption_id"]), kind="stable")


@dataclass(frozen=True)
class RunOptions:
    """How a batched pass runs: rows per batch, DataLoader worker processes, a progress bar of batches on stderr,
    and ``perturb``, applied to each decoded image first (see :class:`aigid.stages.evaluate.Perturbation`). The
    precision is the detector's, chosen when it was loaded (:func:`aigid.detector.model.load_detector`)."""

    batch_size: int = 64
    num_workers: int = 0
    progress: bool = False
    perturb: Callable | None = None


def _batches(detector: Loaded, dataset: Rows, options: RunOptions, step, order: np.ndarray) -> Iterator[tuple]:
    """For every batch, in the caption ``order``: the dataset rows it holds and ``step(model, batch)``'s outputs
    for them as float32 numpy, each an array of the rows' values or, where ``step`` gives one tensor per row
    (rows of different lengths), a list of one array per row."""
    from tqdm import tqdm

    dev = device()
    model = detector.model.to(dev).eval()
    collate = Collator(detector.tokenizer, detector.processor, model.config.max_text_length, perturb=options.perturb)
    loader = DataLoader(
        Subset(dataset, order.tolist()),
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.num_workers,
        pin_memory=dev.type == "cuda",
        collate_fn=collate,
    )
    start = 0
    # One autocast region for the whole pass; the weights it would cast were stored in bf16 at load.
    with autocast(dev, detector.precision):
        for batch in tqdm(loader, desc="scoring", unit="batch", file=sys.stderr, disable=not options.progress):
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items() if not k.startswith("labels_")}
            values = step(model, batch)
            rows = order[start : start + len(values[0])]
            start += len(rows)
            yield (
                rows,
                [
                    [row.float().cpu().numpy() for row in value]
                    if isinstance(value, list)
                    else value.float().cpu().numpy()
                    for value in values
                ],
            )


def _run(detector: Loaded, dataset: Rows, options: RunOptions, step) -> list:
    """``step(model, batch)`` -> a tuple of per-row tensors, for every batch in caption order; each output
    concatenated and put back in the dataset's order as float32 numpy. An output may also be a list of one
    tensor per row (rows of different lengths): it comes back as a list of float32 arrays, in the dataset's
    order."""
    order = caption_order(dataset)
    outputs, per_row = None, None
    for _, values in _batches(detector, dataset, options, step, order):
        outputs = outputs or [[] for _ in values]
        per_row = [isinstance(value, list) for value in values]
        for chunks, value in zip(outputs, values):
            chunks.extend(value) if isinstance(value, list) else chunks.append(value)
    restored = []
    for chunks, rows_given in zip(outputs or [], per_row or []):
        if rows_given:  # one array per row
            rows = [None] * len(chunks)
            for visited, row in zip(order, chunks):
                rows[visited] = row
            restored.append(rows)
            continue
        values = np.concatenate(chunks)
        restored.append(np.empty_like(values))
        restored[-1][order] = values
    return restored


def _logits(model, batch):
    out = model(**batch)
    return out.logits_a, out.logits_b


def _features(model, batch):
    return model.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch.get("token_type_ids"))


def _token_features(model, batch):
    """Every token's feature of each row's caption, padding dropped (a list: one (tokens, dim) tensor per row),
    and the image features."""
    text, image = model.encode(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch.get("token_type_ids"), tokens=True
    )
    return [row[:n] for row, n in zip(text, batch["attention_mask"].sum(dim=1).tolist())], image


@torch.inference_mode()
def predict_logits(detector: Loaded, dataset: Rows, options: RunOptions = RunOptions()):
    """Head A and head B logits for every row, in the dataset's order, as float32 numpy arrays."""
    return tuple(_run(detector, dataset, options, _logits))


@torch.inference_mode()
def encode_features(detector: Loaded, dataset: Rows, options: RunOptions = RunOptions(), tokens: bool = False):
    """The encoders' text and image features for every row, in the dataset's order (float32 numpy). The text
    features are the caption's [CLS] feature, or with ``tokens`` a list holding, per row, the feature of each of
    its caption's tokens (padding dropped) as a (tokens, dim) array."""
    return tuple(_run(detector, dataset, options, _token_features if tokens else _features))


@torch.inference_mode()
def iter_features(
    detector: Loaded, dataset: Rows, options: RunOptions = RunOptions(), tokens: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray | list[np.ndarray], np.ndarray]]:
    """:func:`encode_features` one batch at a time, in caption order (:func:`caption_order`), so that nothing
    grows with the dataset: per batch, the dataset rows it holds, their text features and their image
    features."""
    for rows, (text, image) in _batches(
        detector, dataset, options, _token_features if tokens else _features, caption_order(dataset)
    ):
        yield rows, text, image


def score_images(
    detector: Loaded,
    images: list[bytes | Image.Image],
    captions: list[str],
    scoring: Scoring,
    threshold: float | None = None,
    options: RunOptions = RunOptions(),
) -> list[dict]:
    """Score images in batches: encoded (already known to decode) or decoded already by
    :func:`aigid.core.data.decode_rgb` at the detector's side; one row of scores per image by the model's rule,
    or at ``threshold`` (:func:`aigid.detector.scores.score_rows`)."""
    inputs = [{"Caption": c, "Image": image} for image, c in zip(images, captions)]
    logits_a, logits_b = predict_logits(detector, inputs, options)
    return score_rows(logits_a, logits_b, list(detector.model.config.class_names), captions, scoring, threshold)
