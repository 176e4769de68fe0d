"""Reading, checking and storing datasets in the CT2/Defactify layout.

Layout: columns ``Caption`` (str), ``Image`` (encoded bytes, the `datasets` Image feature), ``Label_A``
(0 real, 1 AI) and ``Label_B`` (0 real, 1 SD 2.1, 2 SDXL, 3 SD 3, 4 DALL-E 3, 5 Midjourney 6), plus
``caption_id`` so that splits can be made by caption. Images stay encoded on disk (memory-mapped Arrow) and
are decoded batch by batch in the DataLoader workers by :class:`Collator`.
"""

from __future__ import annotations

import io
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, concatenate_datasets
from PIL import Image as PILImage

REQUIRED_COLUMNS = ("Caption", "Image", "Label_A", "Label_B")
FEATURES = Features({"Caption": Value("string"), "Image": Image(decode=False), "Label_A": Value("int64"),
                     "Label_B": Value("int64"), "caption_id": Value("int64")})
NUM_CLASSES_B = 6


class DataError(ValueError):
    """Input data that cannot be used; the message names the split, the row and the file where known."""


def where(split: str, row: int, image: dict | None = None) -> str:
    path = (image or {}).get("path")
    return f"{split} row {row}" + (f" ({path})" if path else "")


def decode_rgb(image: dict, origin: str = "") -> PILImage.Image:
    """Decode one stored image to RGB. Raises DataError naming ``origin``; never substitutes a blank image."""
    data, path = image.get("bytes"), image.get("path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            if data is None:
                if not path:
                    raise DataError("no image bytes and no path")
                data = Path(path).read_bytes()
            if len(data) == 0:
                raise DataError("empty image file")
            img = PILImage.open(io.BytesIO(data))
            img.load()
            return img.convert("RGB")
    except DataError as err:
        raise DataError(f"{origin or path}: {err}") from None
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError,
            PILImage.DecompressionBombWarning) as err:
        raise DataError(f"{origin or path}: cannot decode image: {err}") from None


def open_dataset(path: str | Path) -> DatasetDict:
    """Open a stage's Arrow output read-only.

    With caching on, `datasets` writes the results of cast/select/map as cache files next to the data it
    read, which would modify another stage's DVC output and make every later `dvc repro` rerun.
    """
    from datasets import disable_caching, load_from_disk

    disable_caching()
    return load_from_disk(str(path))


def load_source(source: str) -> DatasetDict:
    """A Hugging Face dataset id, a ``save_to_disk`` directory or a directory of ``<split>*.parquet`` files."""
    from datasets import load_dataset

    path = Path(source)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return open_dataset(path)  # never write cache files into the user's dataset
    if path.is_dir():
        files = sorted(path.glob("*.parquet")) + sorted(path.glob("*/*.parquet"))
        if not files:
            raise DataError(f"{path}: no dataset_dict.json and no parquet files")
        return load_dataset("parquet", data_dir=str(path))
    if path.suffix or source.startswith((".", "/")):
        raise DataError(f"{source}: no such directory")
    try:
        return load_dataset(source)
    except Exception as err:  # the hub client raises many types; all mean "not reachable from here"
        raise DataError(f"{source}: could not load the dataset from the Hugging Face hub or its local cache "
                        f"({type(err).__name__}: {err})") from err


def check_split(ds: Dataset, split: str) -> Dataset:
    """Check columns, labels and every image of one split; return it in the canonical features."""
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"split {split}: missing column(s) {', '.join(missing)} (found: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"split {split}: no samples")
    for col in ("Label_A", "Label_B"):
        if isinstance(ds.features[col], ClassLabel):
            ds = ds.cast_column(col, Value("int64"))
    ds = ds.cast_column("Image", Image(decode=False))
    labels_a, labels_b = ds["Label_A"], ds["Label_B"]
    for row, (a, b) in enumerate(zip(labels_a, labels_b)):
        if a not in (0, 1):
            raise DataError(f"{where(split, row)}: Label_A={a!r} is not 0 (real) or 1 (AI)")
        if b not in range(NUM_CLASSES_B):
            raise DataError(f"{where(split, row)}: Label_B={b!r} is not a known class 0..{NUM_CLASSES_B - 1}")
        if (a == 0) != (b == 0):
            raise DataError(f"{where(split, row)}: Label_A={a} contradicts Label_B={b} (Label_B is 0 exactly for real)")
    for start in range(0, len(ds), 256):
        for offset, image in enumerate(ds[start:start + 256]["Image"]):
            row = start + offset
            decode_rgb(image, where(split, row, image))
    if "caption_id" not in ds.column_names:
        ds = ds.add_column("caption_id", caption_ids(ds["Caption"]))
    ds = ds.select_columns(list(FEATURES))
    return ds.cast(FEATURES)


def caption_ids(captions: Sequence[str]) -> list[int]:
    """Same caption text, same id: the unit that splits must not cut through."""
    ids: dict[str, int] = {}
    return [ids.setdefault(c, len(ids)) for c in captions]


def split_by_caption(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split rows so that all rows of one caption land on the same side; ``fraction`` of captions go right."""
    groups = np.array(ds["caption_id"])
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    n_right = max(1, round(len(unique) * fraction))
    if n_right >= len(unique):
        raise DataError(f"cannot split {len(unique)} caption(s) by caption with fraction {fraction}")
    right = set(rng.permutation(unique)[:n_right].tolist())
    is_right = np.array([g in right for g in groups])
    return ds.select(np.flatnonzero(~is_right)), ds.select(np.flatnonzero(is_right))


def shared_captions(a: Dataset, b: Dataset) -> int:
    return len(set(a["Caption"]) & set(b["Caption"]))


def save_atomically(dsd: DatasetDict, out: Path) -> None:
    """Write to a sibling temporary directory, then rename: a crash never leaves a finished-looking output."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # One shard at least: datasets cannot read back an empty split saved with zero shards.
    dsd.save_to_disk(str(tmp), num_shards={k: 1 for k, v in dsd.items() if len(v) == 0} or None)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def concat(*parts: Dataset) -> Dataset:
    """Rows of all parts in the canonical features (extra columns such as confidences dropped)."""
    parts = [p.select_columns(list(FEATURES)).cast(FEATURES) for p in parts if len(p)]
    return concatenate_datasets(parts)


class Collator:
    """Turns rows into model inputs: decodes images (in DataLoader workers), pads text to the batch's longest."""

    def __init__(self, tokenizer, processor, max_length: int):
        self.tokenizer, self.processor, self.max_length = tokenizer, processor, max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [decode_rgb(r["Image"], (r["Image"] or {}).get("path") or "image") for r in rows]
        batch = dict(self.tokenizer([r["Caption"] or "" for r in rows], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt"))
        batch["pixel_values"] = self.processor(images=images, return_tensors="pt")["pixel_values"]
        if "Label_A" in rows[0]:
            batch["labels_a"] = torch.tensor([r["Label_A"] for r in rows], dtype=torch.long)
            batch["labels_b"] = torch.tensor([r["Label_B"] for r in rows], dtype=torch.long)
        return batch
