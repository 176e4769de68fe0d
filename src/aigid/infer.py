"""Batched inference, the one path used by pseudolabel, evaluate and detect."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from .data import Collator


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict_logits(model, tokenizer, processor, dataset: Dataset, batch_size: int, num_workers: int = 0,
                   perturb=None, progress: bool = False):
    """Head A and head B logits for every row, in order, as float32 numpy arrays.

    ``perturb`` transforms each decoded image first (see :class:`aigid.data.Perturbation`); ``progress``
    shows a bar of batches on stderr.
    """
    from tqdm import tqdm

    dev = device()
    model = model.to(dev).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=Collator(tokenizer, processor, model.config.max_text_length, perturb=perturb),
                        pin_memory=dev.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    logits_a, logits_b = [], []
    for batch in tqdm(loader, desc="scoring", unit="batch", file=sys.stderr, disable=not progress):
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items() if not k.startswith("labels_")}
        with autocast:
            out = model(**batch)
        logits_a.append(out.logits_a.float().cpu())
        logits_b.append(out.logits_b.float().cpu())
    return torch.cat(logits_a).numpy().astype(np.float32), torch.cat(logits_b).numpy().astype(np.float32)
