"""Batched inference, the one path used by features, pseudolabel, evaluate, detect and the registered model.

Rows are read from memory-mapped Arrow by a DataLoader whose worker processes decode, resize and tokenise
(:class:`~aigid.data.Collator`); the main process only moves batches to the device and runs the model. Rows
are visited grouped by caption, so the images of one caption share a batch and BERT reads each caption once
(:meth:`~aigid.model.Detector.encode`); results come back in the dataset's order.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Subset

from .data import Collator, schema
from .model import decide
from .runtime import autocast, device


def caption_order(dataset: Dataset) -> np.ndarray:
    """Row indices grouped by caption (stable), or the identity where captions carry no id."""
    if "caption_id" not in dataset.column_names:
        return np.arange(len(dataset))
    return np.argsort(np.asarray(dataset["caption_id"]), kind="stable")


def _run(model, tokenizer, processor, dataset: Dataset, batch_size: int, num_workers: int, precision: str, step,
         perturb=None, progress: bool = False) -> list[np.ndarray]:
    """``step(model, batch)`` -> a tuple of per-row tensors, for every batch in caption order; each output
    concatenated and put back in the dataset's order as float32 numpy."""
    from tqdm import tqdm

    dev = device()
    model = model.to(dev).eval()
    order = caption_order(dataset)
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=dev.type == "cuda",
                        collate_fn=Collator(tokenizer, processor, model.config.max_text_length, perturb=perturb))
    outputs = None
    for batch in tqdm(loader, desc="scoring", unit="batch", file=sys.stderr, disable=not progress):
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items() if not k.startswith("labels_")}
        with autocast(dev, precision):
            values = step(model, batch)
        outputs = outputs or [[] for _ in values]
        for chunks, value in zip(outputs, values):
            chunks.append(value.float().cpu())
    restored = []
    for chunks in outputs or []:
        values = torch.cat(chunks).numpy()
        restored.append(np.empty_like(values))
        restored[-1][order] = values
    return restored


def _logits(model, batch):
    out = model(**batch)
    return out.logits_a, out.logits_b


def _features(model, batch):
    return model.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch.get("token_type_ids"))


@torch.inference_mode()
def predict_logits(model, tokenizer, processor, dataset: Dataset, batch_size: int, num_workers: int = 0,
                   perturb=None, progress: bool = False, precision: str = "auto"):
    """Head A and head B logits for every row, in the dataset's order, as float32 numpy arrays.

    ``perturb`` transforms each decoded image first (see :class:`aigid.data.Perturbation`); ``progress``
    shows a bar of batches on stderr; ``precision`` is one of :data:`aigid.config.PRECISIONS`.
    """
    return tuple(_run(model, tokenizer, processor, dataset, batch_size, num_workers, precision, _logits, perturb,
                      progress))


@torch.inference_mode()
def encode_features(model, tokenizer, processor, dataset: Dataset, batch_size: int, num_workers: int = 0,
                    precision: str = "auto"):
    """The encoders' text and image features for every row, in the dataset's order (float32 numpy)."""
    return tuple(_run(model, tokenizer, processor, dataset, batch_size, num_workers, precision, _features))


def score_images(model, tokenizer, processor, images: list[bytes], captions: list[str], threshold: float = 0.5,
                 batch_size: int = 64, progress: bool = False, precision: str = "auto") -> list[dict]:
    """Score encoded images (already known to decode) in batches: one row of scores per image.

    Class probabilities are joint: P(real) = 1 - P(AI) and P(generator) = P(AI) * P(generator | AI).
    """
    names = list(model.config.class_names)
    ds = Dataset.from_dict({"Caption": list(captions), "Image": [{"bytes": b, "path": None} for b in images]},
                           features=schema(columns=("Caption", "Image")))
    logits_a, logits_b = predict_logits(model, tokenizer, processor, ds, batch_size, progress=progress,
                                        precision=precision)
    pred = decide(torch.from_numpy(logits_a), torch.from_numpy(logits_b), threshold)
    rows = []
    for i, caption in enumerate(captions):
        p_ai = float(pred.prob_ai[i])
        row = {"prob_ai": p_ai, "label": "ai" if pred.label_a[i] else "real",
               "generator": names[int(pred.label_b[i])], "threshold": threshold, "caption": caption}
        row.update({f"p_{n}": (1 - p_ai) if k == 0 else p_ai * float(pred.probs_b[i, k]) for k, n in enumerate(names)})
        rows.append(row)
    return rows
