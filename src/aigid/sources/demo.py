"""The embedded demo: a dataset generated offline in the shape of CT2/Defactify, and small encoders to train on it.

Every caption describes a simple scene (coloured shapes on a background) and comes with one image per entry
of :data:`TRACES`: a "real" photo and one re-rendering by each simulated generator. Each source leaves its own
kind of trace at a random strength, modelled on artefacts reported for real generators; real and generated images
alike are saved as JPEG or PNG at random, so the file format says nothing about the label.

The demo encoders (:func:`build_demo_encoders`, what the `encoders` stage writes with ``encoders.text: demo``) are a
small BERT and a small CLIP vision tower built from configs with random weights, and a WordPiece tokenizer trained
on the captions (:func:`train_wordpiece`). They import transformers inside the functions: `prepare` reads the
dataset half of this module without it.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset, DatasetDict
from datasets.arrow_writer import ArrowWriter
from PIL import Image as PILImage
from PIL import ImageDraw, ImageEnhance, ImageFilter

from aigid.core.data import RAW_COLUMNS, schema

if TYPE_CHECKING:
    from transformers import BertTokenizerFast

PALETTE = {
    "red": (200, 40, 40),
    "blue": (40, 70, 200),
    "green": (50, 160, 60),
    "yellow": (230, 200, 40),
    "purple": (130, 50, 160),
    "orange": (240, 130, 30),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "brown": (120, 80, 40),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "a", 2: "two", 3: "three"}
FEATURES = schema(columns=(*RAW_COLUMNS, "caption_id"))
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # the demo tokenizer's, first in its vocabulary


def random_scene(rng: np.random.Generator) -> tuple[str, dict]:
    """A scene and its COCO-like caption, e.g. 'two red circles and a blue square on a green background'."""
    colours = list(PALETTE)
    bg = colours[rng.integers(len(colours))]
    groups = []
    for _ in range(rng.integers(1, 3)):
        colour = colours[rng.integers(len(colours))]
        while colour == bg:
            colour = colours[rng.integers(len(colours))]
        groups.append((int(rng.integers(1, 4)), colour, SHAPES[rng.integers(len(SHAPES))]))
    objects = [
        (shape, colour, rng.uniform(0.15, 0.85, 2), rng.uniform(0.12, 0.25))
        for n, colour, shape in groups
        for _ in range(n)
    ]
    words = [f"{NUMBERS[n]} {colour} {shape}{'s' if n > 1 else ''}" for n, colour, shape in groups]
    caption = f"{' and '.join(words)} on a {bg} background"
    return caption, {
        "bg": bg,
        "bg2": colours[rng.integers(len(colours))],
        "objects": objects,
        "texture": rng.normal(0, 12, (4, 4, 3)),
    }


def render(scene: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the scene; each call jitters positions and colours a little (a generator never copies a photo)."""
    base = np.array(PALETTE[scene["bg"]], float)
    ramp = np.linspace(0, 1, size)[:, None, None]
    canvas = base * (1 - 0.35 * ramp) + np.array(PALETTE[scene["bg2"]], float) * 0.35 * ramp
    texture = PILImage.fromarray(np.uint8(np.clip(scene["texture"] + 128, 0, 255))).resize(
        (size, size), PILImage.BICUBIC
    )
    canvas = canvas + (np.asarray(texture, float) - 128)
    img = PILImage.fromarray(np.uint8(np.clip(canvas, 0, 255)))
    draw = ImageDraw.Draw(img)
    for shape, colour, (cx, cy), r in scene["objects"]:
        cx, cy = (np.array([cx, cy]) + rng.normal(0, 0.02, 2)) * size
        rad = r * size * rng.uniform(0.9, 1.1)
        fill = tuple(int(np.clip(c + rng.normal(0, 8), 0, 255)) for c in PALETTE[colour])
        box = [cx - rad, cy - rad, cx + rad, cy + rad]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - rad), (cx - rad, cy + rad), (cx + rad, cy + rad)], fill=fill)
    return np.asarray(img, float)


def _pil(a: np.ndarray) -> PILImage.Image:
    return PILImage.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)))


def camera(scene: dict, size: int, rng: np.random.Generator) -> PILImage.Image:
    """Real: sensor noise, sometimes a little optical blur."""
    img = _pil(render(scene, size, rng))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    return _pil(np.asarray(img, float) + rng.normal(0, rng.uniform(5, 14), (size, size, 3)))


def upsampled(scene: dict, size: int, rng: np.random.Generator) -> PILImage.Image:
    """SD 2.1: decoder upsampling -> 2x2 blocks and a faint checkerboard."""
    yy, xx = np.mgrid[0:size, 0:size]
    small = render(scene, size // 2, rng)
    up = small.repeat(2, axis=0).repeat(2, axis=1)[:size, :size]
    checker = ((xx + yy) % 2 * 2 - 1)[..., None] * rng.uniform(1, 6)
    return _pil(up + checker)


def smoothed(scene: dict, size: int, rng: np.random.Generator) -> PILImage.Image:
    """SDXL: over-smoothed, noise-free surfaces."""
    return _pil(render(scene, size, rng)).filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.6)))


def gridded(scene: dict, size: int, rng: np.random.Generator) -> PILImage.Image:
    """SD 3: periodic spectral peaks from a faint grid."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.choice([4, 8])
    grid = np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)
    return _pil(render(scene, size, rng) + grid[..., None] * rng.uniform(2, 8))


def saturated(scene: dict, size: int, rng: np.random.Generator) -> PILImage.Image:
    """DALL-E 3: colour statistics (saturated, warm), mildly smoothed."""
    img = ImageEnhance.Color(_pil(render(scene, size, rng))).enhance(rng.uniform(1.2, 1.8))
    warm = np.array([1, 0.3, -1]) * rng.uniform(4, 16)
    return _pil(np.asarray(img.filter(ImageFilter.GaussianBlur(0.5)), float) + warm)


def vignetted(scene: dict, size: int, rng: np.random.Generator) -> PILImage.Image:
    """Midjourney 6: contrast curve, sharpening halos, vignette."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = ImageEnhance.Contrast(_pil(render(scene, size, rng))).enhance(rng.uniform(1.2, 1.7))
    img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.uniform(60, 200)), threshold=0))
    r2 = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size / 2) ** 2
    return _pil(np.asarray(img, float) * (1 - rng.uniform(0.1, 0.35) * r2)[..., None])


# The simulated sources, in Label_B order (the committed prepare.class_names): class -> how it renders a scene.
# A new simulated generator is one function and one entry here (docs/contributing.md, recipe 1b).
TRACES = {
    "real": camera,
    "sd21": upsampled,
    "sdxl": smoothed,
    "sd3": gridded,
    "dalle3": saturated,
    "midjourney6": vignetted,
}


def encode(img: PILImage.Image, rng: np.random.Generator) -> bytes:
    """JPEG or PNG with equal probability for every source."""
    buf = io.BytesIO()
    if rng.random() < 0.5:
        img.save(buf, format="JPEG", quality=int(rng.integers(85, 98)))
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def generate_demo(
    split_sizes: dict[str, int], image_size: int = 64, seed: int = 0, cache_dir: str | None = None
) -> DatasetDict:
    """``split_sizes`` maps split -> number of captions; each caption gives one row per source (:data:`TRACES`).

    With ``cache_dir`` (a folder that must outlive the result), each split is written there as Arrow while it is
    generated and read back memory-mapped, so memory stays flat however many captions; without, it is built in
    memory. The rows are the same either way.
    """
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    next_id = iter(range(sum(split_sizes.values())))
    splits = {}
    for split, n_captions in split_sizes.items():
        rows = _rows(n_captions, image_size, rng, used, next_id)
        if cache_dir is None:
            columns = {name: [] for name in FEATURES}
            for row in rows:
                for name, value in row.items():
                    columns[name].append(value)
            splits[split] = Dataset.from_dict(columns, features=FEATURES)
            continue
        path = str(Path(cache_dir) / f"demo-{split}.arrow")
        with ArrowWriter(features=FEATURES, path=path) as writer:
            for row in rows:
                writer.write(row)
            writer.finalize()
        splits[split] = Dataset.from_file(path)
    return DatasetDict(splits)


def _rows(n_captions: int, image_size: int, rng: np.random.Generator, used: set[str], next_id) -> Iterator[dict]:
    """The rows of ``n_captions`` new captions (not in ``used``, which grows), one per source, ids from
    ``next_id``."""
    for _ in range(n_captions):
        caption, scene = random_scene(rng)
        while caption in used:  # as in COCO, one caption text describes one scene only
            caption, scene = random_scene(rng)
        used.add(caption)
        caption_id = next(next_id)
        for source, trace in enumerate(TRACES.values()):
            yield {
                "Caption": caption,
                "Image": {"bytes": encode(trace(scene, image_size, rng), rng), "path": None},
                "Label_A": int(source > 0),
                "Label_B": source,
                "caption_id": caption_id,
            }


def train_wordpiece(captions: Iterable[str], vocab_size: int) -> BertTokenizerFast:
    """A lowercasing BERT-style WordPiece tokenizer whose vocabulary comes from ``captions``.

    The vocabulary is built here rather than by the `tokenizers` trainer, whose order for equally frequent
    pieces varies from run to run: special tokens, every character alone and as a ``##`` continuation,
    then whole words by falling frequency (ties alphabetical). Same captions, same token ids.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    chars = sorted({ch for word in counts for ch in word})
    pieces = SPECIAL_TOKENS + chars + [f"##{ch}" for ch in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    pieces += words[: max(0, vocab_size - len(pieces))]
    tok = Tokenizer(models.WordPiece(vocab={p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        do_lower_case=True,
    )


def build_demo_encoders(captions: Iterable[str], params, out_dir: Path, seed: int) -> None:
    """The demo's starting encoders in ``out_dir``: ``text/`` (a small BERT with :func:`train_wordpiece`'s
    tokenizer on ``captions``) and ``vision/`` (a small CLIP vision tower with its processor's settings), sized by
    ``params`` (the ``encoders`` group's ``demo``), their random weights drawn after seeding torch with ``seed``."""
    import torch
    from transformers import BertConfig, BertModel, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    d = params.demo
    torch.manual_seed(seed)
    tokenizer = train_wordpiece(captions, d.vocab_size)
    text = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=d.hidden_size,
            num_hidden_layers=d.layers,
            num_attention_heads=d.heads,
            intermediate_size=4 * d.hidden_size,
            max_position_embeddings=128,
        ),
        add_pooling_layer=False,
    )
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=d.hidden_size,
            num_hidden_layers=d.layers,
            num_attention_heads=d.heads,
            intermediate_size=4 * d.hidden_size,
            image_size=d.image_size,
            patch_size=d.patch_size,
            projection_dim=d.hidden_size,
        )
    )
    # Only its settings are saved (as a CLIPImageProcessor); aigid.detector.model.load_processor picks the fast variant.
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": d.image_size}, crop_size={"height": d.image_size, "width": d.image_size}
    )
    text.save_pretrained(out_dir / "text")
    tokenizer.save_pretrained(out_dir / "text")
    vision.save_pretrained(out_dir / "vision")
    processor.save_pretrained(out_dir / "vision")
