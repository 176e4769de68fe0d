"""Offline stand-ins for the paper's hub inputs: same architectures and schema, random content.

``bert_base`` and ``clip_vit_b32`` write directories that load like ``bert-base-uncased`` and
``openai/clip-vit-base-patch32`` (full size, random weights); ``defactify_parquet`` writes a tiny dataset in
the Defactify (CT2) schema as parquet files named by split. Nothing here needs the network.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from transformers import BertConfig, BertModel, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from aigid.sources.demo import train_wordpiece

# `load_dataset("parquet", data_dir=...)` names splits by file name and only knows these (plus aliases such
# as "valid"/"dev"); a file with another name (e.g. "unlabeled.parquet") is silently left out.
SPLITS = ("train", "validation", "test")
N_CLASSES = 6  # Label_B: 0 real, 1 SD 2.1, 2 SDXL, 3 SD 3, 4 DALL-E 3, 5 Midjourney 6


def bert_base(out_dir: Path, captions: list[str]) -> Path:
    """bert-base-uncased architecture with random weights, and a WordPiece tokenizer trained on ``captions``.

    Loads with ``AutoModel.from_pretrained(out_dir, add_pooling_layer=False)`` and ``AutoTokenizer``. The
    tokenizer's vocabulary (<= 1000) is smaller than the model's (30522); every id stays in range.
    """
    out_dir = Path(out_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(), add_pooling_layer=False).save_pretrained(out_dir)
    train_wordpiece(captions, vocab_size=1000).save_pretrained(out_dir)
    return out_dir


def clip_vit_b32(out_dir: Path) -> Path:
    """openai/clip-vit-base-patch32 vision tower (random weights) and a default ``CLIPImageProcessor``.

    Loads with ``CLIPVisionModel.from_pretrained`` and ``AutoImageProcessor.from_pretrained``.
    """
    out_dir = Path(out_dir)
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig()).save_pretrained(out_dir)
    CLIPImageProcessor().save_pretrained(out_dir)
    return out_dir


def _noise_image(rng: np.random.Generator, size: int, fmt: str) -> bytes:
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(pixels, mode="RGB").save(buf, format=fmt)
    return buf.getvalue()


def defactify_parquet(out_dir: Path, captions: dict[str, int], seed: int = 0, size: int = 64) -> Path:
    """Write ``out_dir/<split>.parquet`` for each split in ``captions`` (split -> number of captions).

    Each caption has six rows, Label_B 0..5 (Label_A 0 for the real one, else 1), each with a random-noise
    RGB image of ``size`` px, half JPEG and half PNG (every class in both: the format never gives the label
    away). ``load_dataset("parquet", data_dir=str(out_dir))`` reads it back as a DatasetDict with these
    splits; ``Image`` is the `datasets` Image feature (struct {bytes, path}, path None).
    """
    unknown = set(captions) - set(SPLITS)
    if unknown:
        raise ValueError(f"split(s) {sorted(unknown)} would be ignored by load_dataset; use {SPLITS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = Features(
        {"Caption": Value("string"), "Image": Image(), "Label_A": Value("int64"), "Label_B": Value("int64")}
    )
    rng = np.random.default_rng(seed)
    for split, n in captions.items():
        rows: dict[str, list] = {"Caption": [], "Image": [], "Label_A": [], "Label_B": []}
        for c in range(n):
            caption = f"a {split} photo number {c} of a scene with a red house near the sea"
            for b in range(N_CLASSES):
                fmt = "JPEG" if (c + b) % 2 == 0 else "PNG"  # every class gets both formats
                rows["Caption"].append(caption)
                rows["Image"].append({"bytes": _noise_image(rng, size, fmt), "path": None})
                rows["Label_A"].append(int(b != 0))
                rows["Label_B"].append(b)
        Dataset.from_dict(rows, features=features).to_parquet(str(out_dir / f"{split}.parquet"))
    return out_dir
