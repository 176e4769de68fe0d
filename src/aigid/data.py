"""Reading, checking and storing datasets in the CT2/Defactify layout.

Layout: columns ``Caption`` (str), ``Image`` (encoded bytes, the `datasets` Image feature), ``Label_A``
(0 real, 1 AI) and ``Label_B`` (0 real, 1 SD 2.1, 2 SDXL, 3 SD 3, 4 DALL-E 3, 5 Midjourney 6), plus
``caption_id`` so that splits can be made by caption (rows of one caption text share it) and ``source_file``
(where the image came from, for messages). Images stay encoded on disk (memory-mapped Arrow) and
are decoded batch by batch in the DataLoader workers by :class:`Collator`.
"""

from __future__ import annotations

import io
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, concatenate_datasets
from PIL import Image as PILImage

REQUIRED_COLUMNS = ("Caption", "Image", "Label_A", "Label_B")
CLASS_NAMES = ("real", "sd21", "sdxl", "sd3", "dalle3", "midjourney6")
FEATURES = Features({"Caption": Value("string"), "Image": Image(decode=False), "Label_A": Value("int64"),
                     "Label_B": Value("int64"), "caption_id": Value("int64"), "source_file": Value("string")})


class DataError(ValueError):
    """Input data that cannot be used; the message names the split, the row and the file where known."""


@dataclass(frozen=True)
class CheckOptions:
    """How :func:`check_split` treats rows (see the ``prepare`` params)."""

    class_names: tuple[str, ...] = CLASS_NAMES
    on_bad: str = "error"          # "error": stop at the first bad row; "skip": leave it out, report it
    max_pixels: int = 89_478_485   # larger images are refused (decompression-bomb guard)
    max_side: int = 0              # > 0: store images larger than this resized (shortest side), as PNG


@dataclass
class Rejected:
    split: str
    row: int
    file: str
    reason: str


def where(split: str, row: int, image: dict | None = None) -> str:
    path = (image or {}).get("path")
    return f"{split} row {row}" + (f" ({path})" if path else "")


def _open(image: dict, max_pixels: int) -> tuple[bytes, PILImage.Image]:
    data, path = image.get("bytes"), image.get("path")
    if data is None:
        if not path:
            raise DataError("no image bytes and no path")
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise DataError(f"cannot read image file: {err.strerror or err}") from None
    if len(data) == 0:
        raise DataError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise DataError(f"image of {img.width}x{img.height} pixels is larger than {max_pixels} pixels "
                                f"(decompression-bomb guard)")
            img.load()
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as err:
        raise DataError(f"decompression-bomb guard: {err}") from None
    except PILImage.UnidentifiedImageError:
        raise DataError("cannot decode image: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot decode image: {err}") from None
    return data, img


def to_rgb(img: PILImage.Image) -> PILImage.Image:
    """8-bit RGB. 16-bit grayscale ("I;16*", and "I" as Pillow opens 16-bit PNGs) is scaled from 0..65535 to
    0..255: a plain convert("RGB") clips every value above 255 to white."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        wide = np.asarray(img, dtype=np.float64)
        img = PILImage.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def decode_rgb(image: dict, origin: str = "", max_pixels: int = CheckOptions.max_pixels) -> PILImage.Image:
    """Decode one stored image to RGB. Raises DataError naming ``origin``; never substitutes a blank image."""
    try:
        return to_rgb(_open(image, max_pixels)[1])
    except DataError as err:
        raise DataError(f"{origin or image.get('path') or 'image'}: {err}") from None


def checked_image(image: dict, opts: CheckOptions) -> bytes:
    """The bytes to store for one image: the original encoding, or a PNG resized to ``opts.max_side``.

    Alpha, grayscale, palette and CMYK images are kept as they are; they are converted to RGB when decoded.
    """
    data, img = _open(image, opts.max_pixels)
    rgb = to_rgb(img)  # fails here, not in training, if the mode cannot be converted
    if opts.max_side and min(img.size) > opts.max_side:
        scale = opts.max_side / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        buf = io.BytesIO()
        rgb.resize(size, PILImage.BICUBIC).save(buf, format="PNG")
        data = buf.getvalue()
    return data


def open_dataset(path: str | Path) -> DatasetDict:
    """Open a stage's Arrow output read-only.

    With caching on, `datasets` writes the results of cast/select/map as cache files next to the data it
    read, which would modify another stage's DVC output and make every later `dvc repro` rerun.
    """
    from datasets import disable_caching, load_from_disk

    disable_caching()
    return load_from_disk(str(path))


def load_source(source: str, layout: str = "auto", class_names: tuple[str, ...] = CLASS_NAMES,
                aliases: dict[str, str] | None = None) -> DatasetDict:
    """Read ``source`` in ``layout``: hub, arrow (save_to_disk), parquet, competition or folders."""
    from datasets import load_dataset

    from . import sources

    path = Path(source)
    if layout == "auto":
        if path.is_dir():
            layout = sources.detect_layout(path)
        elif path.suffix or source.startswith((".", "/")):
            raise DataError(f"{source}: no such directory")
        else:
            layout = "hub"
    if layout != "hub" and not path.is_dir():
        raise DataError(f"{source}: no such directory (prepare.layout={layout})")
    if layout == "arrow":
        return open_dataset(path)  # never write cache files into the user's dataset
    if layout == "parquet":
        return load_dataset("parquet", data_dir=str(path))
    if layout == "competition":
        return sources.read_competition(path, class_names, aliases or {})
    if layout == "folders":
        return sources.read_folders(path, class_names, aliases or {})
    try:
        return load_dataset(source)
    except Exception as err:  # the hub client raises many types; all mean "not reachable from here"
        raise DataError(f"{source}: could not load the dataset from the Hugging Face hub or its local cache "
                        f"({type(err).__name__}: {err})") from err


def features(class_names: tuple[str, ...] = CLASS_NAMES) -> Features:
    return Features({"Caption": Value("string"), "Image": Image(decode=False), "Label_A": Value("int64"),
                     "Label_B": ClassLabel(names=list(class_names)), "caption_id": Value("int64"),
                     "source_file": Value("string")})


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


def check_split(ds: Dataset, split: str, cache_dir: str, opts: CheckOptions = CheckOptions(),
                rejected: list[Rejected] | None = None) -> Dataset:
    """Check columns, labels and every image of one split; return it in the canonical features.

    Rows are streamed to an Arrow file under ``cache_dir`` (which must outlive the returned dataset), so
    memory stays flat however large the split is. A bad row stops
    with a DataError naming the split, row and file, or, with ``opts.on_bad == "skip"``, is left out and
    appended to ``rejected``. Nothing is ever replaced by a made-up sample.
    """
    from datasets.exceptions import DatasetGenerationError

    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"split {split}: missing column(s) {', '.join(missing)} (found: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"split {split}: no samples")
    for col in ("Label_A", "Label_B"):
        if isinstance(ds.features[col], ClassLabel):
            ds = ds.cast_column(col, Value("int64"))
    ds = ds.cast_column("Image", Image(decode=False))
    has_ids = "caption_id" in ds.column_names
    rejected = rejected if rejected is not None else []
    skipped_before = len(rejected)

    def rows():
        ids: dict[str, int] = {}
        for start in range(0, len(ds), 256):
            batch = ds[start:start + 256]
            for i, (caption, image, a, b) in enumerate(zip(batch["Caption"], batch["Image"], batch["Label_A"],
                                                           batch["Label_B"])):
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
                yield {"Caption": caption, "Image": {"bytes": data, "path": None}, "Label_A": a, "Label_B": b,
                       "caption_id": cid, "source_file": (image or {}).get("path") or f"{split} row {row}"}

    try:
        out = Dataset.from_generator(rows, features=features(opts.class_names), cache_dir=cache_dir)
    except DatasetGenerationError as err:
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        raise
    if len(out) == 0:
        raise DataError(f"split {split}: no samples left after skipping {len(rejected) - skipped_before} bad row(s)")
    return out


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


def save_atomically(dsd: DatasetDict, out: Path, extra_files: dict[str, str] | None = None) -> None:
    """Write to a sibling temporary directory, then rename: a crash never leaves a finished-looking output."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # One shard at least: datasets cannot read back an empty split saved with zero shards.
    dsd.save_to_disk(str(tmp), num_shards={k: 1 for k, v in dsd.items() if len(v) == 0} or None)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def concat(*parts: Dataset) -> Dataset:
    """Rows of all parts in the canonical features (extra columns such as confidences dropped)."""
    parts = [p.select_columns(list(FEATURES)).cast(FEATURES) for p in parts if len(p)]
    return concatenate_datasets(parts)


@dataclass(frozen=True)
class Perturbation:
    """One condition of the robustness grid, applied to a decoded RGB image before the image processor.

    kind: "jpeg" (re-encode at quality ``value``), "blur" (Gaussian blur, standard deviation ``value`` pixels)
    or "resize" (both sides times ``value``, bicubic). A plain object, so DataLoader workers can receive it.
    """

    kind: str
    value: float

    @property
    def name(self) -> str:
        """Metric-key friendly: jpeg_95, blur_1, resize_50 (percent of the original size)."""
        value = self.value * 100 if self.kind == "resize" else self.value
        return f"{self.kind}_{value:g}".replace(".", "p")

    def __call__(self, img: PILImage.Image) -> PILImage.Image:
        from PIL import ImageFilter

        if self.kind == "jpeg":
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=int(self.value))
            return PILImage.open(buf).convert("RGB")
        if self.kind == "blur":
            return img.filter(ImageFilter.GaussianBlur(radius=self.value))  # Pillow's radius is the sigma
        if self.kind == "resize":
            size = (max(1, round(img.width * self.value)), max(1, round(img.height * self.value)))
            return img.resize(size, PILImage.BICUBIC)
        raise ValueError(f"unknown perturbation {self.kind!r} (jpeg, blur or resize)")


class Collator:
    """Turns rows into model inputs: decodes images (in DataLoader workers), pads text to the batch's longest.

    ``perturb`` (evaluation's robustness grid) transforms each decoded image. ``caption_dropout`` replaces
    each caption by "" with that probability; only the training loader gets a collator with it (see
    train.py). The draws come from torch's global generator, which the Trainer seeds (and DataLoader seeds
    per worker from it) and saves in its checkpoints: the same seed drops the same captions, resumed or not.
    """

    def __init__(self, tokenizer, processor, max_length: int, perturb=None, caption_dropout: float = 0.0):
        self.tokenizer, self.processor, self.max_length = tokenizer, processor, max_length
        self.perturb, self.caption_dropout = perturb, caption_dropout

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [decode_rgb(r["Image"], r.get("source_file") or "image") for r in rows]
        if self.perturb is not None:
            images = [self.perturb(img) for img in images]
        captions = [r["Caption"] or "" for r in rows]
        if self.caption_dropout > 0:
            drop = (torch.rand(len(rows)) < self.caption_dropout).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        batch = dict(self.tokenizer(captions, padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt"))
        batch["pixel_values"] = self.processor(images=images, return_tensors="pt")["pixel_values"]
        if "Label_A" in rows[0]:
            batch["labels_a"] = torch.tensor([r["Label_A"] for r in rows], dtype=torch.long)
            batch["labels_b"] = torch.tensor([r["Label_B"] for r in rows], dtype=torch.long)
        return batch
