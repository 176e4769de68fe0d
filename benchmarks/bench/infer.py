"""Inference throughput: images/s of the pipeline's scoring path (`aigid.detector.infer.predict_logits`, the
path of features, pseudolabel, evaluate and detect) on the pool split, at the default precision (auto: float32
on the CPU, bf16 on a GPU) and at ``inference.precision: bf16``, against two references on the same rows:

- the reference implementation's way, one image at a time in float32 with captions padded to 128 tokens;
- the ceiling of any path: the vision encoder alone on the rows' ready pixel tensors (no decoding, no text, no
  heads), which the pipeline alternates with so that each pair of timings shares the machine's conditions.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aigid.core.data import Collator, decode_rgb, open_dataset
from aigid.detector.infer import RunOptions, caption_order, predict_logits
from aigid.detector.runtime import autocast, device
from bench.common import BASELINE_TOKENS, CONFIGS, detector, infer_batch, peak_mb


@dataclass(frozen=True)
class Rounds:
    """How many (pipeline, ceiling) pairs to time: at least ``least`` and until the pairs took ``seconds`` (a
    small N gets more pairs, as its short passes are the noisier), at most ``most``."""

    least: int = 5
    most: int = 25
    seconds: float = 40.0

    def more(self, pipeline_s: list[float], ceiling_s: list[float]) -> bool:
        done = len(pipeline_s)
        return done < self.most and (done < self.least or sum(pipeline_s) + sum(ceiling_s) < self.seconds)


class Passes:
    """The passes compared on the pool split of ``work``, with one detector at a time, loaded for a precision as
    the pipeline loads it (at bf16, the weights autocast casts are stored in bf16): the pipeline's pass and the
    ceiling, that detector's vision encoder alone on the rows' pixel tensors."""

    def __init__(self, work: Path, workers: int, precision: str):
        self.work, self.workers, self.dev, self.batch = work, workers, device(), infer_batch()
        self.pool = open_dataset(work / "prepared")["unlabeled"]
        self.detector = self.model = None
        self.load(precision)
        rows = [self.pool[int(i)] for i in caption_order(self.pool)]
        collate = Collator(self.detector.tokenizer, self.detector.processor, self.model.config.max_text_length)
        self.pixels = [collate.images(rows[i : i + self.batch]).to(self.dev) for i in range(0, len(rows), self.batch)]

    def load(self, precision: str) -> None:
        """A fresh detector for ``precision`` (the same weights: seed 0), in place of the previous one, which is
        freed first so that the process holds one detector, as a scoring stage does."""
        self.detector = self.model = None
        gc.collect()
        torch.manual_seed(0)
        self.detector = detector(self.work, precision)
        self.model = self.detector.model.to(self.dev).eval()

    def pipeline(self) -> None:
        predict_logits(self.detector, self.pool, RunOptions(batch_size=self.batch, num_workers=self.workers))

    def vision_only(self) -> None:
        with torch.inference_mode(), autocast(self.dev, self.detector.precision):
            for chunk in self.pixels:
                self.model.vision_encoder(pixel_values=chunk).pooler_output.cpu()

    def warm_up(self) -> None:
        first = self.pool.select(range(min(self.batch, len(self.pool))))
        predict_logits(self.detector, first, RunOptions(batch_size=self.batch, num_workers=0))
        self.vision_only()


def child_infer(work: Path, config: str, workers: int, rounds: Rounds = Rounds()) -> dict:
    """Images/s of the pipeline and its ceiling at both precisions (the medians of the paired rounds, and the
    median of the rounds' ratios: the pipeline's share of the ceiling) and of the one-image baseline. The peak
    memory is read after the default precision's rounds, before the baseline and bf16 run."""
    # auto is the pipeline's default (float32 on the CPU, bf16 on a GPU); bf16 is inference.precision bf16,
    # which on the CPU pays only where it has bf16 instructions.
    passes = Passes(work, workers, "auto")
    result = _compared(passes, "infer_images_s", rounds)
    result["peak_mb_infer"] = peak_mb()
    passes.load("fp32")
    result["infer_images_s_baseline"] = _baseline_rate(passes, CONFIGS[config]["baseline_images"])
    passes.load("bf16")
    result.update(_compared(passes, "infer_images_s_bf16", rounds))
    return result


def _compared(passes: Passes, key: str, rounds: Rounds) -> dict:
    """The pipeline against its ceiling at the precision ``passes`` holds: a warm-up of each, then the paired
    rounds, summarised under ``key``."""
    passes.warm_up()
    return _summary(key, len(passes.pool), *_paired_rounds(passes, rounds))


def _baseline_rate(passes: Passes, images: int) -> float:
    """The reference's way: one image at a time, its caption padded to 128 tokens, preprocessing on the main
    thread, in float32 (``passes`` holds a float32 detector)."""
    model, tokenizer, processor = passes.model, passes.detector.tokenizer, passes.detector.processor
    rows = passes.pool.select(range(min(images, len(passes.pool))))
    with torch.inference_mode():
        started = time.perf_counter()
        for row in rows:
            image = processor(images=[decode_rgb(row["Image"])], return_tensors="pt")["pixel_values"]
            text = tokenizer(
                [row["Caption"]], padding="max_length", truncation=True, max_length=BASELINE_TOKENS, return_tensors="pt"
            )
            out = model(pixel_values=image.to(passes.dev), **text.to(passes.dev))
            out.logits_a.cpu(), out.logits_b.cpu()
        return len(rows) / (time.perf_counter() - started)


def _paired_rounds(passes: Passes, rounds: Rounds) -> tuple[list[float], list[float]]:
    """Seconds of the pipeline's pass and of the ceiling's, alternating, round after round."""
    pipeline_s, ceiling_s = [], []
    while rounds.more(pipeline_s, ceiling_s):
        pipeline_s.append(_seconds(passes.pipeline))
        ceiling_s.append(_seconds(passes.vision_only))
    return pipeline_s, ceiling_s


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _summary(key: str, images: int, pipeline_s: list[float], ceiling_s: list[float]) -> dict:
    """The rates (medians of the rounds) and the pipeline's share of the ceiling (median, range, rounds)."""
    ratios = [c / p for c, p in zip(ceiling_s, pipeline_s)]
    share = key.replace("infer_images_s", "infer_of_ceiling")
    return {
        key: images / statistics.median(pipeline_s),
        key.replace("infer_", "vision_only_"): images / statistics.median(ceiling_s),
        share: statistics.median(ratios),
        share + "_range": [min(ratios), max(ratios)],
        share + "_rounds": len(ratios),
    }
