"""The `prepare` stage: read the source, check every row, split by caption where needed, store as Arrow."""

from __future__ import annotations

import csv
import hashlib
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from datasets import DatasetDict

from .config import PrepareParams
from .data import (CheckOptions, DataError, Rejected, check_split, load_source, save_atomically, shared_captions,
                   split_by_caption)

log = logging.getLogger(__name__)


def prepare(params: PrepareParams, seed: int, out_dir: Path, report: Path | None = None) -> dict:
    """Write the checked dataset to ``out_dir``; return its metrics.

    ``report`` receives one CSV row per skipped row (``on_bad: skip``) and per duplicated image.
    """
    started = time.perf_counter()
    class_names = tuple(params.class_names)
    if params.source == "demo":
        from .demo import generate_demo

        raw = generate_demo(params.demo.captions, image_size=params.demo.image_size, seed=seed)
    else:
        raw = load_source(params.source, params.layout, class_names, params.class_aliases)
    if "train" not in raw:
        raise DataError(f"{params.source}: no train split (splits: {', '.join(raw) or 'none'})")
    opts = CheckOptions(class_names, params.on_bad, params.max_pixels, params.max_side)
    rejected: list[Rejected] = []
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out_dir.parent) as cache:
        splits = {name: check_split(ds, name, cache, opts, rejected) for name, ds in raw.items()}
        made = []
        for name, fraction in (("test", params.test_fraction), ("validation", params.validation_fraction)):
            if name not in splits:
                splits["train"], splits[name] = split_by_caption(splits["train"], fraction, seed)
                made.append(name)
        dsd = DatasetDict(splits)
        checked_rows = sum(len(ds) for ds in raw.values())
        save_atomically(dsd, out_dir)
    elapsed = time.perf_counter() - started

    duplicates, tensor_bytes = scan_stored(out_dir)
    if report is not None:
        write_report(report, rejected, duplicates)
    metrics: dict = {"source": params.source, "splits_made_by_caption": made, "splits": {},
                     "skipped": {"total": len(rejected)}, "duplicates": {}}
    for r in rejected:
        metrics["skipped"][r.split] = metrics["skipped"].get(r.split, 0) + 1
    for name, ds in dsd.items():
        labels = list(ds["Label_B"])
        metrics["splits"][name] = {"rows": len(ds), "captions": len(set(ds["caption_id"])),
                                   "per_class": {n: labels.count(k) for k, n in enumerate(class_names)}}
    names = list(dsd)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            metrics[f"shared_captions_{a}_{b}"] = shared_captions(dsd[a], dsd[b])
    for kind, pairs in duplicates.items():
        metrics["duplicates"][kind] = len(pairs)
    stored = sum(f.stat().st_size for f in out_dir.rglob("*.arrow"))
    rows = sum(len(ds) for ds in dsd.values())
    metrics["bytes_per_sample"] = stored / rows
    # The reference implementation stored every image as a float32 3xHxW tensor.
    metrics["float32_tensor_bytes_per_sample"] = tensor_bytes / rows
    log.info("prepared %d rows (%d skipped) in %.1f s: %.0f images/s, %.0f bytes per sample", rows,
             len(rejected), elapsed, checked_rows / elapsed, stored / rows)
    return metrics


def scan_stored(data_dir: Path) -> tuple[dict[str, list[tuple]], int]:
    """Images with identical bytes (within one split, and across two: a leak worth knowing about), and the
    bytes the same images would take as float32 3xHxW tensors."""
    import io

    from PIL import Image

    from .data import open_dataset

    seen: dict[str, tuple[str, int]] = {}
    found: dict[str, list[tuple]] = defaultdict(list)
    tensor_bytes = 0
    for split, ds in open_dataset(data_dir).items():
        for start in range(0, len(ds), 512):
            batch = ds[start:start + 512]
            for i, (image, file) in enumerate(zip(batch["Image"], batch["source_file"])):
                with Image.open(io.BytesIO(image["bytes"])) as img:  # reads the header only
                    tensor_bytes += 3 * img.width * img.height * 4
                digest = hashlib.sha256(image["bytes"]).hexdigest()
                if digest in seen:
                    first = seen[digest]
                    kind = "within_" + split if first[0] == split else f"across_{first[0]}_{split}"
                    found[kind].append((split, start + i, file, first))
                else:
                    seen[digest] = (split, start + i)
    return dict(found), tensor_bytes


def write_report(path: Path, rejected: list[Rejected], duplicates: dict[str, list[tuple]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "row", "file", "action", "reason"])
        for r in rejected:
            w.writerow([r.split, r.row, r.file, "skipped", r.reason])
        for kind, items in sorted(duplicates.items()):
            for split, row, file, (first_split, first_row) in items:
                w.writerow([split, row, file, "kept", f"duplicate ({kind}): same bytes as {first_split} row {first_row}"])
    tmp.replace(path)
