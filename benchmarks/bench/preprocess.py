"""Image preprocessing alone, as the DataLoader workers run it: decode and the image processor, in images/s per
worker (one thread), on the config's stored images and on ~1024 px JPEGs made from them (smooth upscales, as
photos are; the real dataset's images are JPEGs of that size). It says how many workers a rate needs."""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch
from PIL import Image

from aigid.core.data import Collator, open_dataset
from aigid.detector.model import load_processor


def child_preprocess(work: Path, seconds: float = 3.0) -> dict:
    """Images/s of :class:`aigid.core.data.Collator`'s image half over 64 rows, repeated for ``seconds``."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    processor = load_processor(work / "encoders" / "vision")
    rows = [dict(r) for r in open_dataset(work / "prepared")["unlabeled"].select(range(64))]
    collate = Collator(None, processor, 0)
    result = {"preprocess_backend": type(processor).__name__}
    for key, batch in (("preprocess_images_s_stored", rows), ("preprocess_images_s_jpeg1024", _jpeg_1024(rows))):
        collate.images(batch[:8])  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            collate.images(batch)
            done += len(batch)
        result[key] = done / (time.perf_counter() - started)
    return result


def _jpeg_1024(rows: list[dict]) -> list[dict]:
    """The rows with their images upscaled to 1024 px wide (bicubic) and stored as JPEGs (quality 90)."""
    large = []
    for r in rows:
        buf = io.BytesIO()
        img = Image.open(io.BytesIO(r["Image"]["bytes"])).convert("RGB")
        img.resize((1024, 1024 * img.height // img.width), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        large.append({**r, "Image": {"bytes": buf.getvalue(), "path": None}})
    return large
