"""The `prepare` stage: read the source, check every row, split by caption where needed, store as Arrow."""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import DatasetDict

from .config import PrepareParams
from .data import DataError, check_split, load_source, save_atomically, shared_captions, split_by_caption

log = logging.getLogger(__name__)


def prepare(params: PrepareParams, seed: int, out_dir: Path) -> dict:
    if params.source == "demo":
        from .demo import generate_demo

        raw = generate_demo(params.demo.captions, image_size=params.demo.image_size, seed=seed)
    else:
        raw = load_source(params.source)
    if "train" not in raw:
        raise DataError(f"{params.source}: no train split (splits: {', '.join(raw) or 'none'})")
    splits = {name: check_split(ds, name) for name, ds in raw.items()}
    made_validation = "validation" not in splits
    if made_validation:
        splits["train"], splits["validation"] = split_by_caption(splits["train"], params.validation_fraction, seed)
    if "test" not in splits:
        raise DataError(f"{params.source}: no test split; evaluate needs a labeled test split")
    dsd = DatasetDict(splits)
    save_atomically(dsd, out_dir)

    metrics: dict = {"source": params.source, "validation_made_by_caption": made_validation, "splits": {}}
    for name, ds in dsd.items():
        labels = list(ds["Label_B"])
        metrics["splits"][name] = {"rows": len(ds), "captions": len(set(ds["caption_id"])),
                                   "per_class": {str(k): labels.count(k) for k in range(6)}}
    metrics["shared_captions_train_validation"] = shared_captions(dsd["train"], dsd["validation"])
    metrics["shared_captions_train_test"] = shared_captions(dsd["train"], dsd["test"])
    stored = sum(f.stat().st_size for f in out_dir.rglob("*.arrow"))
    metrics["bytes_per_sample"] = stored / sum(len(ds) for ds in dsd.values())
    return metrics
