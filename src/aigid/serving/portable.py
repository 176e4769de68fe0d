"""The portable detector: a trained detector's network as ONNX, scored by onnxruntime without torch.

`aigid export` (:mod:`aigid.stages.export`) writes a portable detector directory: ``model.onnx`` (the graph) and
``model.onnx.data`` (its float32 weights) beside the trained detector's own config, tokenizer and image
processor files. `aigid detect --model` on such a directory imports numpy, Pillow, tokenizers and onnxruntime
and nothing of torch or transformers, so that scoring a few images takes about a second instead of three.

Its inputs are prepared as the detector's were: the caption by the tokenizer's ``tokenizer.json`` (the
`tokenizers` library transformers' fast tokenizers run), truncated to the detector's ``max_text_length``
and padded to the batch's longest; the image as transformers' PIL image processor prepares it from the saved
``preprocessor_config.json`` (resize, centre crop, rescale, normalise; tests/test_portable.py compares them).
The torch path runs transformers' torchvision-backed processor, whose pixels agree with the PIL one's within
0.02 on average (tests/test_model.py); `aigid export` reports how far the two paths' P(AI) lie apart.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from aigid.core.data import decode_rgb, input_side
from aigid.core.errors import DataError

GRAPH = "model.onnx"
WEIGHTS = "model.onnx.data"  # the graph's weights, stored beside it (read by onnxruntime, never copied twice)
INPUTS = ("input_ids", "attention_mask", "pixel_values")
OUTPUTS = ("logits_a", "logits_b")


OPSET = 18  # the ONNX opset the graph is written in


def write_graph(detector, example: dict[str, np.ndarray], out: Path) -> None:
    """Write ``out/model.onnx`` and ``out/model.onnx.data`` for ``detector`` (a torch detector, float32, eval
    mode), traced by torch.onnx's exporter on ``example`` inputs (two rows at least, so that the batch is not
    specialised to one), with the batch and the caption length dynamic. The export stage's writer, beside the
    reader; torch is imported here only (scoring a portable detector never imports it)."""
    import logging
    import warnings

    import torch

    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    args = tuple(torch.from_numpy(example[name]) for name in INPUTS)
    for name in ("onnx_ir", "onnxscript"):  # their optimiser logs every rewrite at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():  # the exporter warns that it names dynamic axes after the dims, not ours
        warnings.filterwarnings("ignore", message=".*axis name", category=UserWarning)
        program = torch.onnx.export(
            raw_scoring(detector).eval(),
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            verbose=False,
            dynamic_shapes={
                "input_ids": {0: batch, 1: tokens},
                "attention_mask": {0: batch, 1: tokens},
                "pixel_values": {0: batch},
            },
        )
    for node in program.model.graph.all_nodes():  # tracing records each node's stack trace: files of this machine
        node.metadata_props.clear()
    program.save(str(out / GRAPH), external_data=True)  # the weights go to model.onnx.data (WEIGHTS)


def raw_scoring(detector):
    """The detector on raw inputs -> (head A logits, head B logits), every row's caption encoded (no shapes that
    depend on the data): the module the graph is traced from."""
    from torch import nn

    class RawScoring(nn.Module):
        def __init__(self):
            super().__init__()
            self.detector = detector

        def forward(self, input_ids, attention_mask, pixel_values):
            out = self.detector(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, share_captions=False
            )
            return out.logits_a, out.logits_b

    return RawScoring()


def is_portable(path: Path) -> bool:
    return (Path(path) / GRAPH).is_file()


def decode_side(model_dir: Path) -> int:
    """The side images are decoded reduced to (:func:`aigid.core.data.decode_rgb`) for the detector in
    ``model_dir``, torch or portable: both keep their image processor's ``preprocessor_config.json``."""
    path = Path(model_dir) / "preprocessor_config.json"
    try:
        return input_side(json.loads(path.read_text())["size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: no image processor size to decode images to ({err})") from None


class Preprocessor:
    """A saved CLIP-style image processor's steps on Pillow images: what transformers' PIL backend does for
    the settings it reads (anything else in the file is refused, not ignored)."""

    def __init__(self, path: Path):
        cfg = json.loads(path.read_text())
        if cfg.get("do_pad"):
            raise DataError(f"{path}: do_pad is not supported by the portable detector")
        size, crop = cfg.get("size") or {}, cfg.get("crop_size") or {}
        if not cfg.get("do_resize", True) or set(size) not in ({"shortest_edge"}, {"height", "width"}):
            raise DataError(
                f"{path}: size {size} is not supported by the portable detector (do_resize with "
                "shortest_edge, or height and width)"
            )
        self.size, self.resample = size, Image.Resampling(cfg.get("resample", Image.Resampling.BICUBIC))
        self.side = input_side(size)  # what images are decoded reduced to (aigid.core.data.decode_rgb)
        self.crop = (crop["height"], crop["width"]) if cfg.get("do_center_crop") else None
        smallest = size.get("shortest_edge") or min(size["height"], size["width"])
        if self.crop and max(self.crop) > smallest:
            raise DataError(f"{path}: crop_size {crop} is larger than the resized image {size}")
        self.scale = float(cfg["rescale_factor"]) if cfg.get("do_rescale", True) else None
        self.mean, self.std = (
            (np.asarray(cfg["image_mean"], np.float32), np.asarray(cfg["image_std"], np.float32))
            if cfg.get("do_normalize", True)
            else (None, None)
        )

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, as transformers computes it: the shortest edge to the size, the
        other edge scaled and truncated."""
        if "shortest_edge" not in self.size:
            return self.size["width"], self.size["height"]
        edge = self.size["shortest_edge"]
        short, long = min(width, height), max(width, height)
        long = int(edge * long / short)
        return (edge, long) if width <= height else (long, edge)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """RGB images -> pixel_values, (batch, 3, height, width) float32."""
        out = []
        for img in images:
            img = img.resize(self.target(*img.size), resample=self.resample)
            pixels = np.asarray(img)
            if self.crop:
                top, left = (pixels.shape[0] - self.crop[0]) // 2, (pixels.shape[1] - self.crop[1]) // 2
                pixels = pixels[top : top + self.crop[0], left : left + self.crop[1]]
            # rescaled in float64 then cast, as transformers does: the same float32 values to the bit
            pixels = (pixels.astype(np.float64) * self.scale if self.scale else pixels).astype(np.float32)
            if self.mean is not None:
                pixels = (pixels - self.mean) / self.std
            out.append(pixels.transpose(2, 0, 1))
        return np.stack(out)


class Inputs:
    """A detector directory's tokenizer and image steps: its images and captions as the graph's inputs."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            config = json.loads((path / "config.json").read_text())
            self.class_names = list(config["class_names"])
            pad = json.loads((path / "tokenizer_config.json").read_text())["pad_token"]
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path}: not a detector directory with a tokenizer.json ({err})") from None
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise DataError(f"{path}: the tokenizer has no padding token {pad!r}")
        self.tokenizer.enable_truncation(int(config["max_text_length"]))
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad)
        self.preprocess = Preprocessor(path / "preprocessor_config.json")

    def __call__(self, images: list[Image.Image], captions: list[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for RGB images and their captions."""
        encoded = self.tokenizer.encode_batch([c or "" for c in captions])
        return {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            "pixel_values": self.preprocess(images),
        }


class PortableDetector:
    """A portable detector directory, loaded: its inputs' steps and an onnxruntime session of its graph."""

    def __init__(self, path: Path):
        import onnxruntime

        if not is_portable(path):
            raise DataError(f"{path}: no {GRAPH}; not a portable detector written by `aigid export`")
        self.inputs = Inputs(path)
        self.class_names = self.inputs.class_names
        options = onnxruntime.SessionOptions()
        # OMP_NUM_THREADS, when set, is the thread count, as for a torch model (Spark sets it to each task's cores,
        # spark.task.cpus); else onnxruntime's default, one per physical core.
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            options.intra_op_num_threads = int(os.environ["OMP_NUM_THREADS"])
        try:
            self.session = onnxruntime.InferenceSession(
                str(path / GRAPH), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types for a bad or truncated graph
            raise DataError(f"{path / GRAPH}: onnxruntime cannot load it ({type(err).__name__}: {err})") from None

    def logits(
        self, images: list[bytes | Image.Image], captions: list[str], batch_size: int = 64, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Head A and head B logits of images, scored ``batch_size`` at a time: encoded (already known to
        decode), decoded a batch at a time, or decoded already by :func:`decode_rgb` at :func:`decode_side`."""
        from tqdm import tqdm

        chunks_a, chunks_b = [], []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", file=sys.stderr, disable=not progress):
            side = self.inputs.preprocess.side
            decoded = [decode_rgb(image, side=side) for image in images[start : start + batch_size]]
            logits_a, logits_b = self.session.run(
                list(OUTPUTS), self.inputs(decoded, captions[start : start + batch_size])
            )
            chunks_a.append(logits_a)
            chunks_b.append(logits_b)
        return np.concatenate(chunks_a), np.concatenate(chunks_b)
