"""Datasets in the CT2/Defactify layout: the schema, decoding, splits, storage and the training collator.

Layout: columns ``Caption`` (str), ``Image`` (encoded bytes, the `datasets` Image feature), ``Label_A``
(0 real, 1 AI) and ``Label_B`` (the index into ``prepare.class_names``: 0 real, then the generators), plus
``caption_id`` so that splits can be made by caption (rows of one caption text share it) and ``source_file``
(where the image came from, for messages). Images stay encoded on disk (memory-mapped Arrow) and
are decoded batch by batch in the DataLoader workers by :class:`Collator`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import stat
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image as PILImage

from aigid.core.errors import DataError
from aigid.core.files import atomic_path

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict, Features

# `datasets` (and pyarrow) and torch are imported by the functions that need them, not here: `aigid detect`
# decodes through this module and never opens an Arrow dataset, and on a portable detector never imports torch.

# The one column schema. Prepared rows have every column; sources deliver the first four (RAW_COLUMNS).
COLUMNS = ("Caption", "Image", "Label_A", "Label_B", "caption_id", "source_file")
RAW_COLUMNS = COLUMNS[:4]


def schema(class_names: tuple[str, ...] | None = None, columns: tuple[str, ...] = COLUMNS) -> Features:
    """Features of ``columns``. With ``class_names``, Label_B is a ClassLabel carrying them (prepared data);
    without, a plain integer (raw rows, pseudo-labels). Images stay encoded bytes."""
    from datasets import ClassLabel, Features, Image, Value

    types = {
        "Caption": Value("string"),
        "Image": Image(decode=False),
        "Label_A": Value("int64"),
        "Label_B": ClassLabel(names=list(class_names)) if class_names else Value("int64"),
        "caption_id": Value("int64"),
        "source_file": Value("string"),
    }
    return Features({c: types[c] for c in columns})


def class_names_of(ds: Dataset) -> tuple[str, ...]:
    """The class names a prepared split carries (Label_B is a ClassLabel written by prepare)."""
    from datasets import ClassLabel

    label_b = ds.features["Label_B"]
    if not isinstance(label_b, ClassLabel):
        raise DataError("Label_B carries no class names: not a dataset written by `aigid prepare`")
    return tuple(label_b.names)


MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit; prepare.max_pixels sets it for prepared data
# A reduced image keeps its shorter side at least this many times the encoder's input side, so that the image
# processor's own (antialiased) resize still makes the last step, from between 2 and 4 times its size.
REDUCE_MARGIN = 2
# An image that is decoded at more than this many pixels (one that neither `draft` nor its size lets be read
# smaller) waits for the one being decoded before it: at most one such image's full pixels exist at a time,
# whatever the number of threads decoding.
WHOLE_DECODE_PIXELS = 16_000_000
_whole_decode = threading.Lock()


def input_side(size) -> int:
    """The side an image processor resizes to, from its ``size`` setting (a dict or transformers' SizeDict): the
    shortest edge, or the larger of height and width."""
    edge = size.get("shortest_edge")
    return int(edge) if edge else int(max(size["height"], size["width"]))


def not_a_file(path: Path) -> str | None:
    """Why ``path`` is no image file, for what reading it would misname or wait on: a broken or looping
    symbolic link, a folder, a pipe, socket or device (``stat``, without opening it). None for a file, or for
    a missing one (reading it says so)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"broken symbolic link (to {os.readlink(path)}, which does not exist)" if path.is_symlink() else None
    except OSError as err:
        return f"symbolic link loop ({err.strerror})" if err.errno == errno.ELOOP else None
    if stat.S_ISDIR(mode):
        return "a folder, not an image file" + (" (a link to a folder is not followed)" if path.is_symlink() else "")
    return None if stat.S_ISREG(mode) else "not a regular file (a pipe, socket or device)"


def read_file(path: str | Path) -> bytes:
    """The bytes of the image file ``path``; a DataError for anything that is not a regular file, checked before
    it is opened (reading a device never ends, opening a pipe waits for a writer)."""
    try:
        problem = not_a_file(Path(path))
    except ValueError as err:  # a name with a NUL character
        raise DataError(f"not a file name: {err}") from None
    if problem:
        raise DataError(problem)
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read image file: {err.strerror or err}") from None


def open_image(image: dict, max_pixels: int, side: int | None = None) -> tuple[bytes, PILImage.Image]:
    """The encoded bytes of a stored image (``bytes``, else read from ``path``) and the image decoded: whole, or
    with ``side`` reduced as it is read (:func:`reduce_to`)."""
    data, path = image.get("bytes"), image.get("path")
    if data is None:
        if not path:
            raise DataError("no image bytes and no path")
        data = read_file(path)
    if len(data) == 0:
        raise DataError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise DataError(
                    f"image of {img.width}x{img.height} pixels is larger than {max_pixels} pixels "
                    f"(decompression-bomb guard)"
                )
            img = reduce_to(img, side) if side else _loaded(img)
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as err:
        raise DataError(f"decompression-bomb guard: {err}") from None
    except PILImage.UnidentifiedImageError:
        raise DataError("cannot decode image: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot decode image: {err}") from None
    return data, img


def _factor(size: tuple[int, int], side: int) -> int:
    """The integer factor an image of ``size`` can be reduced by and keep REDUCE_MARGIN x ``side`` pixels."""
    return max(1, min(size) // (REDUCE_MARGIN * side))


def _loaded(img: PILImage.Image) -> PILImage.Image:
    """``img`` decoded, one whole-size decode at a time above WHOLE_DECODE_PIXELS."""
    with _whole_decode if img.width * img.height > WHOLE_DECODE_PIXELS else contextlib.nullcontext():
        img.load()
    return img


def reduce_to(img: PILImage.Image, side: int) -> PILImage.Image:
    """An opened image decoded in RGB, reduced by an integer factor as far as it keeps REDUCE_MARGIN x ``side``
    pixels on its shorter side: a JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``draft``: the whole
    image's pixels never exist), any image is then shrunk by :meth:`PIL.Image.Image.reduce` (block averages) and
    its whole pixels dropped at once."""
    if (factor := _factor(img.size, side)) > 1:  # sizes rounded up: libjpeg's scale stays at most the factor
        img.draft(img.mode, (-(-img.width // factor), -(-img.height // factor)))  # a no-op but for JPEG
    with _whole_decode if img.width * img.height > WHOLE_DECODE_PIXELS else contextlib.nullcontext():
        img.load()
        rgb = to_rgb(img)
        if (factor := _factor(rgb.size, side)) > 1:
            rgb = rgb.reduce(factor)
        if rgb is not img:
            img.close()  # the whole pixels go now, before the next whole-size decode may start
    return rgb


def to_rgb(img: PILImage.Image) -> PILImage.Image:
    """8-bit RGB (the image itself where it is RGB already). 16-bit grayscale ("I;16*", and "I" as Pillow opens
    16-bit PNGs) is scaled from 0..65535 to 0..255: a plain convert("RGB") clips every value above 255 to
    white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        wide = np.asarray(img, dtype=np.float64)
        img = PILImage.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


@functools.cache
def image_suffixes() -> frozenset[str]:
    """The file suffixes of the formats Pillow opens: the image files prepare reads from folders and detect finds
    in folders; a folder named like an image is a bad row, not a folder to walk. A function: Pillow's registry
    loads every format plugin (about 0.1 s), which scoring one named file does not need."""
    return frozenset(x for x, fmt in PILImage.registered_extensions().items() if fmt in PILImage.OPEN)


FILE_FORMATS = ("JPEG", "PNG", "other")


def file_format(data: bytes) -> str:
    """The file format of encoded image bytes as reports count it: JPEG, PNG or other (header only)."""
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            kind = img.format
    except (PILImage.UnidentifiedImageError, OSError):
        kind = None
    return kind if kind in FILE_FORMATS else "other"


def decode_rgb(
    image: dict | bytes | PILImage.Image, origin: str = "", max_pixels: int = MAX_PIXELS, side: int | None = None
) -> PILImage.Image:
    """Decode one image (a stored one, ``bytes`` or ``path``, or encoded bytes) to RGB, the one decode of
    training, evaluation, export and every scoring path: with ``side`` (the encoder's input side,
    :func:`input_side` of its image processor) reduced as it is read (:func:`reduce_to`), without it whole. An
    image given already decoded (a :class:`PIL.Image.Image`, from this function at the same ``side``) is returned
    as it is. Raises DataError naming ``origin``; never substitutes a blank image."""
    if isinstance(image, PILImage.Image):
        return image
    if isinstance(image, bytes):
        image = {"bytes": image}
    try:
        img = open_image(image, max_pixels, side)[1]
        return img if side else to_rgb(img)
    except DataError as err:
        raise DataError(f"{origin or image.get('path') or 'image'}: {err}") from None


def open_dataset(path: str | Path) -> DatasetDict:
    """Open a stage's Arrow output read-only.

    With caching on, `datasets` writes the results of cast/select/map as cache files next to the data it
    read, which would modify another stage's DVC output and make every later `dvc repro` rerun.
    """
    from datasets import disable_caching, load_from_disk

    disable_caching()
    return load_from_disk(str(path))


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


def save_dataset(dsd: DatasetDict, out: Path, extra_files: dict[str, str] | None = None) -> None:
    """Save atomically (see :mod:`aigid.core.files`), with ``extra_files`` (name -> text) beside the splits."""
    with atomic_path(out) as tmp:
        # One shard at least: datasets cannot read back an empty split saved with zero shards.
        dsd.save_to_disk(str(tmp), num_shards={k: 1 for k, v in dsd.items() if len(v) == 0} or None)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def concat(*parts: Dataset) -> Dataset:
    """Rows of all parts in the schema of the first (extra columns such as confidences dropped)."""
    from datasets import concatenate_datasets

    features = schema(class_names_of(parts[0]))
    return concatenate_datasets([p.select_columns(list(COLUMNS)).cast(features) for p in parts if len(p)])


class Collator:
    """Turns rows into model inputs: decodes images (in DataLoader workers), pads text to the batch's longest.

    ``perturb`` (evaluation's robustness grid) transforms each decoded image. Caption dropout is a transform of
    the training rows (:class:`aigid.training.trainer.DropCaptions`), not the collator's.
    """

    def __init__(self, tokenizer, processor, max_length: int, perturb=None):
        self.tokenizer, self.processor, self.max_length = tokenizer, processor, max_length
        self.side = input_side(processor.size)  # images are decoded reduced to what the processor needs
        self.perturb = perturb

    def images(self, rows: list[dict]) -> torch.Tensor:
        """The rows' images decoded (:func:`decode_rgb`, reduced to the processor's side; an image given decoded
        is taken as it is), perturbed and put through the image processor: ``pixel_values``."""
        images = [decode_rgb(r["Image"], r.get("source_file") or "image", side=self.side) for r in rows]
        if self.perturb is not None:
            images = [self.perturb(img) for img in images]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        import torch

        captions = [r["Caption"] or "" for r in rows]
        batch = dict(
            self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )
        batch["pixel_values"] = self.images(rows)
        if "Label_A" in rows[0]:
            batch["labels_a"] = torch.tensor([r["Label_A"] for r in rows], dtype=torch.long)
            batch["labels_b"] = torch.tensor([r["Label_B"] for r in rows], dtype=torch.long)
        return batch
