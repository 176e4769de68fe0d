"""The `prepare` stage: read the source, check every row, split by caption where needed, store as Arrow.

The source is ``demo`` (generated from code and params), a Hugging Face dataset id at ``prepare.revision``,
or a local directory inside the raw data folder (``data/raw``), which is a DVC-tracked dependency of this
stage: adding, changing or removing a file there reruns prepare and everything after it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import sys
import tempfile
import time
from array import array
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Image, Value
from PIL import Image as PILImage
from tqdm import tqdm

from aigid.core import stage
from aigid.core.data import (
    FILE_FORMATS,
    RAW_COLUMNS,
    DataError,
    file_format,
    open_dataset,
    open_image,
    save_dataset,
    schema,
    split_by_caption,
    to_rgb,
)
from aigid.core.files import atomic_path, write_json, writing
from aigid.sources.readers import Rejected, inside, load_source

log = logging.getLogger(__name__)
PARAMS = ("seed", "prepare")


@dataclass(frozen=True)
class Paths:
    raw: Path = stage.path(
        "data/raw", "Raw data folder (DVC-tracked); a local prepare.source must be inside it.", exists=True
    )
    out: Path = stage.path("data/prepared", "Directory for the checked dataset (Arrow, save_to_disk layout).")
    report: Path = stage.path(
        "reports/prepare.json",
        "Report: rows, captions and classes per split, shared "
        "captions, duplicates, skipped rows, ignored entries, bytes per sample, source revision, fingerprint.",
    )
    quarantine: Path = stage.path(
        "reports/quarantine.csv",
        "CSV of every skipped row (prepare.on_bad: skip) and every duplicated image, with the reason.",
    )


@dataclass(frozen=True)
class CheckOptions:
    """How :func:`check_split` treats rows (see the ``prepare`` params)."""

    class_names: tuple[str, ...]
    on_bad: str = "error"  # "error": stop at the first bad row; "skip": leave it out, report it
    max_pixels: int = 89_478_485  # larger images are refused (decompression-bomb guard)
    max_side: int = 0  # > 0: store images larger than this resized (shortest side), as PNG
    root: Path | None = None  # image paths in rows are resolved against it and must stay inside it


def run(params, paths: Paths) -> dict:
    """Read prepare.source, check every row, store it.

    The source is `demo`, a Hugging Face dataset id (at prepare.revision), or a local directory inside RAW
    (DVC-tracked) in one of the layouts arrow (save_to_disk), parquet, competition (captions table + one
    folder per source) or folders (one folder per class); see prepare.layout. A bad row stops the stage with
    its split, row, file and reason, or, with prepare.on_bad: skip, is left out and listed in QUARANTINE.
    """
    report = prepare(params.prepare, params.seed, paths.out, paths.quarantine, paths.raw)
    write_json(paths.report, report)
    return report


command = stage.command("prepare", run, Paths, PARAMS)


def prepare(params, seed: int, out_dir: Path, quarantine: Path | None = None, raw: Path | None = None) -> dict:
    """Write the checked dataset to ``out_dir``; return its report.

    ``quarantine`` receives one CSV row per skipped row (``on_bad: skip``) and per duplicated image. A local
    source must lie inside ``raw`` (when given), where DVC sees its files.
    """
    started = time.perf_counter()
    class_names = tuple(params.class_names)
    rejected: list[Rejected] = []
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with writing(out_dir), tempfile.TemporaryDirectory(prefix=".prepare-", dir=out_dir.parent) as cache:
        raw_splits, origin = read_source(params, seed, raw, cache, rejected)
        # Image paths inside arrow/parquet rows are relative to the dataset and may not leave it.
        root = Path(params.source) if origin.get("layout") in ("arrow", "parquet") else None
        opts = CheckOptions(class_names, params.on_bad, params.max_pixels, params.max_side, root)
        splits = {name: check_split(ds, name, cache, opts, rejected) for name, ds in raw_splits.items()}
        made = []
        for name, fraction in (("test", params.test_fraction), ("validation", params.validation_fraction)):
            if name not in splits:
                splits["train"], splits[name] = split_by_caption(splits["train"], fraction, seed)
                made.append(name)
        dsd = DatasetDict(splits)
        checked_rows = sum(len(ds) for ds in raw_splits.values())
        save_dataset(dsd, out_dir)
    elapsed = time.perf_counter() - started

    duplicates, tensor_bytes, fingerprint, formats = scan_stored(out_dir, class_names)
    if quarantine is not None:
        write_quarantine(quarantine, rejected, duplicates)
    stored = sum(f.stat().st_size for f in out_dir.rglob("*.arrow"))
    rows = sum(len(ds) for ds in dsd.values())
    report = {
        **origin,
        "fingerprint": fingerprint,
        "splits_made_by_caption": made,
        **contents(dsd, class_names, rejected, duplicates),
        "formats": formats,
        "bytes_per_sample": stored / rows,
        # The reference implementation stored every image as a float32 3xHxW tensor.
        "float32_tensor_bytes_per_sample": tensor_bytes / rows,
    }
    if origin.get("ignored"):
        log.info("ignored, not samples: %s", ", ".join(f"{n} {what}" for what, n in origin["ignored"].items()))
    rate = checked_rows / elapsed
    log.info(
        "prepared %d rows (%d skipped) in %.1f s: %.0f images/s, %.0f bytes per sample",
        rows,
        len(rejected),
        elapsed,
        rate,
        stored / rows,
    )
    return report


def read_source(params, seed: int, raw: Path | None, cache: str, rejected: list[Rejected]) -> tuple[dict, dict]:
    """The raw splits of ``prepare.source`` (the generated demo, or a dataset read by its layout) and what the
    report says of their origin; rows a reader refuses go to ``rejected``."""
    if params.source == "demo":
        from aigid.sources.demo import TRACES, generate_demo

        if len(params.class_names) != len(TRACES):
            raise DataError(
                f"prepare.source=demo generates {len(TRACES)} classes ({', '.join(TRACES)}); "
                f"prepare.class_names has {len(params.class_names)}"
            )
        raw_splits = generate_demo(params.demo.captions, params.demo.image_size, seed, cache_dir=cache)
        origin = {"source": params.source}
    else:
        raw_splits, origin = load_source(params, raw, rejected)
    if "train" not in raw_splits:
        raise DataError(f"{params.source}: no train split (splits: {', '.join(raw_splits) or 'none'})")
    return raw_splits, origin


def contents(dsd: DatasetDict, class_names: tuple[str, ...], rejected: list[Rejected], duplicates: dict) -> dict:
    """The report's account of the stored splits: rows, captions and classes per split, skipped rows per split,
    duplicated images, and captions two splits share."""
    skipped = {"total": len(rejected)}
    for r in rejected:
        skipped[r.split] = skipped.get(r.split, 0) + 1
    out: dict = {"splits": {}, "skipped": skipped, "duplicates": {k: len(v) for k, v in duplicates.items()}}
    for name, ds in dsd.items():
        labels = list(ds["Label_B"])
        out["splits"][name] = {
            "rows": len(ds),
            "captions": len(set(ds["caption_id"])),
            "per_class": {n: labels.count(k) for k, n in enumerate(class_names)},
        }
    names = list(dsd)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out[f"shared_captions_{a}_{b}"] = len(set(dsd[a]["Caption"]) & set(dsd[b]["Caption"]))
    return out


def where(split: str, row: int, image: dict | None = None) -> str:
    path = (image or {}).get("path")
    return f"{split} row {row}" + (f" ({path})" if path else "")


def checked_image(image: dict, opts: CheckOptions) -> bytes:
    """The bytes to store for one image: the original encoding, or a PNG resized to ``opts.max_side``.

    Alpha, grayscale, palette and CMYK images are kept as they are; they are converted to RGB when decoded.
    """
    if opts.root is not None and image.get("bytes") is None and image.get("path"):
        image = {"bytes": None, "path": str(inside(opts.root, image["path"], "Image path"))}
    data, img = open_image(image, opts.max_pixels)
    rgb = to_rgb(img)  # fails here, not in training, if the mode cannot be converted
    if opts.max_side and min(img.size) > opts.max_side:
        scale = opts.max_side / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        buf = io.BytesIO()
        rgb.resize(size, PILImage.BICUBIC).save(buf, format="PNG")
        data = buf.getvalue()
    return data


def _check_row(caption, image, a, b, opts: CheckOptions) -> bytes:
    if caption is not None and not isinstance(caption, str):
        raise DataError(f"Caption must be text, got {caption!r}")
    if a not in (0, 1):
        raise DataError(f"Label_A={a!r} is not 0 (real) or 1 (AI)")
    if b not in range(len(opts.class_names)):
        raise DataError(f"Label_B={b!r} is not a known class 0..{len(opts.class_names) - 1}")
    if (a == 0) != (b == 0):
        raise DataError(f"Label_A={a} contradicts Label_B={b} (Label_B is 0 exactly for real images)")
    return checked_image(image or {}, opts)


def check_split(
    ds: Dataset, split: str, cache_dir: str, opts: CheckOptions, rejected: list[Rejected] | None = None
) -> Dataset:
    """Check columns, labels and every image of one split; return it in the prepared schema.

    Rows are streamed to an Arrow file under ``cache_dir`` (which must outlive the returned dataset), so memory
    stays flat however large the split is. A bad row stops with a DataError naming the split, row and file, or,
    with ``opts.on_bad == "skip"``, is left out and appended to ``rejected``. No sample is ever made up.
    """
    from datasets.exceptions import DatasetGenerationError

    ds = raw_columns(ds, split)
    has_ids = "caption_id" in ds.column_names
    rejected = rejected if rejected is not None else []
    skipped_before = len(rejected)
    content: list[bytes] = []  # one digest per stored row (a list: `datasets` pickles the generator to hash it)

    def rows():
        yield from _stored_rows(ds, split, opts, rejected, content, has_ids)

    try:
        out = Dataset.from_generator(rows, features=schema(opts.class_names), cache_dir=cache_dir)
    except DatasetGenerationError as err:
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        raise
    if len(out) == 0:
        raise DataError(f"split {split}: no samples left after skipping {len(rejected) - skipped_before} bad row(s)")
    # The stored dataset's fingerprint comes from its rows only. `datasets` would derive it from the generator's
    # code, so that any edit of this module changed data/prepared and reran the whole pipeline.
    fingerprint = hashlib.sha256(repr((split, opts.class_names)).encode() + b"".join(content)).hexdigest()[:16]
    return out.select(range(len(out)), new_fingerprint=fingerprint)


def _stored_rows(ds: Dataset, split: str, opts: CheckOptions, rejected: list, content: list, has_ids: bool):
    """:func:`check_split`'s rows in the prepared schema, each checked; a bad one raises or goes to ``rejected``;
    the digest of each row kept goes to ``content``."""
    ids: dict[str, int] = {}
    # A bar on a terminal only, closed (with a new line) when a row stops the split: the error reads alone.
    bar = tqdm(total=len(ds), desc=f"checking {split}", unit="image", file=sys.stderr, disable=None)
    try:
        for start in range(0, len(ds), 256):
            batch = ds[start : start + 256]
            for i, (caption, image, a, b) in enumerate(
                zip(batch["Caption"], batch["Image"], batch["Label_A"], batch["Label_B"])
            ):
                row = start + i
                try:
                    data = _check_row(caption, image, a, b, opts)
                except DataError as err:
                    if opts.on_bad != "skip":
                        raise DataError(f"{where(split, row, image)}: {err}") from None
                    rejected.append(Rejected(split, row, (image or {}).get("path") or "", str(err)))
                    continue
                caption = caption or ""
                # An empty caption says nothing about which images belong together: its own group.
                cid = batch["caption_id"][i] if has_ids else ids.setdefault(caption or f"\0{row}", len(ids))
                # The bytes are the sample; where they came from is kept apart (an Image path that exists
                # on disk would be preferred to the bytes by `datasets`).
                source_file = (image or {}).get("path") or f"{split} row {row}"
                content.append(hashlib.sha256(repr((caption, a, b, cid, source_file)).encode() + data).digest())
                yield {
                    "Caption": caption,
                    "Image": {"bytes": data, "path": None},
                    "Label_A": a,
                    "Label_B": b,
                    "caption_id": cid,
                    "source_file": source_file,
                }
            bar.update(len(batch["Caption"]))
    finally:
        bar.close()


def raw_columns(ds: Dataset, split: str) -> Dataset:
    """One split's rows with the raw columns checked and typed: labels as integers, images as encoded bytes."""
    from datasets import ClassLabel

    missing = [c for c in RAW_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"split {split}: missing column(s) {', '.join(missing)} (found: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"split {split}: no samples")
    for col in ("Label_A", "Label_B"):
        if isinstance(ds.features[col], ClassLabel):
            ds = ds.cast_column(col, Value("int64"))
    return ds.cast_column("Image", Image(decode=False))


def scan_stored(data_dir: Path, class_names: tuple[str, ...]) -> tuple[dict[str, list[tuple]], int, str, dict]:
    """Images with identical bytes (within one split, and across two: a leak worth knowing about), the bytes
    the same images would take as float32 3xHxW tensors, a fingerprint of the stored rows (split, caption,
    labels and image bytes, in order): the same data gives the same fingerprint on any machine, and the file
    formats per split and class (:func:`format_summary`).

    Per row it keeps only its image's digest and a few numbers in arrays, so memory grows by some 50 bytes a row.
    """
    digests = bytearray()  # every image's sha256, in the order read: all splits one after the other
    starts: list[tuple[str, int]] = []  # (split, index of its first row in ``digests``)
    tensor_bytes = 0
    fingerprint = hashlib.sha256()
    formats: dict = {}
    data = open_dataset(data_dir)
    for split, ds in data.items():
        starts.append((split, len(digests) // 32))
        labels, kinds, sizes, sides = (array("q") for _ in range(4))  # per image: Label_B, format, bytes, side
        for start in range(0, len(ds), 512):
            batch = ds[start : start + 512]
            for i, image in enumerate(batch["Image"]):
                with PILImage.open(io.BytesIO(image["bytes"])) as img:  # reads the header only
                    tensor_bytes += 3 * img.width * img.height * 4
                    labels.append(batch["Label_B"][i])
                    kinds.append(FILE_FORMATS.index(file_format(image["bytes"])))
                    sizes.append(len(image["bytes"]))
                    sides.append(min(img.size))
                digest = hashlib.sha256(image["bytes"])
                digests += digest.digest()
                fingerprint.update(
                    repr(
                        (split, batch["Caption"][i], batch["Label_A"][i], batch["Label_B"][i], digest.hexdigest())
                    ).encode()
                )
        labels, kinds, sizes, sides = (np.frombuffer(a, np.int64) for a in (labels, kinds, sizes, sides))
        formats[split] = {
            class_names[k]: format_summary(kinds[labels == k], sizes[labels == k], sides[labels == k])
            for k in np.unique(labels).tolist()
        }
    return _duplicates(data, digests, starts), tensor_bytes, fingerprint.hexdigest(), formats


def _duplicates(data, digests: bytearray, starts: list[tuple[str, int]]) -> dict[str, list[tuple]]:
    """Each image whose bytes an earlier one has (``digests``: one sha256 per row of every split, in order), under
    its kind (``within_<split>`` or ``across_<first split>_<split>``), in the order read: (split, row, source
    file, (split, row) of the first image with those bytes)."""
    keys = np.frombuffer(bytes(digests), dtype="S32")
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    split_of = np.searchsorted([start for _, start in starts], np.arange(len(keys)), side="right") - 1
    found: dict[str, list[tuple]] = defaultdict(list)
    for index in np.flatnonzero(first[inverse] != np.arange(len(keys))).tolist():
        split, start = starts[split_of[index]]
        first_split, first_start = starts[split_of[first[inverse[index]]]]
        first_row = int(first[inverse[index]]) - first_start
        kind = "within_" + split if first_split == split else f"across_{first_split}_{split}"
        file = data[split][index - start]["source_file"]
        found[kind].append((split, index - start, file, (first_split, first_row)))
    return dict(found)


def format_summary(kinds: np.ndarray, sizes: np.ndarray, sides: np.ndarray) -> dict:
    """What the images of one class look like as files, given each one's format (an index into FILE_FORMATS),
    size (bytes) and shorter side (pixels): how many are JPEG, PNG or another format, and the median file size
    and shorter side. A class whose format or size differs from the others lets a detector learn the file
    instead of the image (e.g. "JPEG = real"); evaluate's format-controlled test measures whether it did."""
    return {
        "n": len(kinds),
        **{kind: int((kinds == i).sum()) for i, kind in enumerate(FILE_FORMATS)},
        "median_bytes": float(np.median(sizes)),
        "median_shorter_side": float(np.median(sides)),
    }


def write_quarantine(path: Path, rejected: list[Rejected], duplicates: dict[str, list[tuple]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "row", "file", "action", "reason"])
        for r in rejected:
            w.writerow([r.split, "" if r.row < 0 else r.row, r.file, "skipped", r.reason])
        for kind, items in sorted(duplicates.items()):
            for split, row, file, (first_split, first_row) in items:
                w.writerow(
                    [split, row, file, "kept", f"duplicate ({kind}): same bytes as {first_split} row {first_row}"]
                )
