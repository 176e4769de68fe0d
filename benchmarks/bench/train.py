"""Training throughput: Trainer samples/s with the pipeline's collator (captions padded to the longest in the
batch) against the same rows with every caption padded to 128 tokens, as the reference did; and, for demo at size
N, one full fine-tuning epoch against one frozen-encoder epoch on cached features."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import BASELINE_TOKENS, CONFIGS, cuda, detector, peak_mb


class PadTo128:
    """The reference's text handling: every caption padded to 128 tokens."""

    def __init__(self, collator):
        self.inner = collator

    def __call__(self, rows):
        batch = self.inner(rows)
        text = self.inner.tokenizer(
            [r["Caption"] for r in rows],
            padding="max_length",
            truncation=True,
            max_length=BASELINE_TOKENS,
            return_tensors="pt",
        )
        batch.update(text)
        return batch


def child_train(work: Path, config: str, steps: int, epoch_compare: bool) -> dict:
    """Samples/s of ``steps`` Trainer steps, the pipeline's against 128-token padding on the same rows, in one
    process; the peak memory is read before the baseline runs."""
    import torch

    from aigid.core.data import Collator, open_dataset

    batch = CONFIGS[config]["train_batch"]
    base = open_dataset(work / "prepared")["train"]
    train = repeat_rows(base, batch * (steps + 1))
    torch.manual_seed(0)
    ours = detector(work)
    collator = Collator(ours.tokenizer, ours.processor, 64)
    rate = train_rate(ours.model, train, collator, batch, steps, work / "ckpt")
    result = {"train_samples_s": rate, "peak_mb_train": peak_mb(), "train_rows": len(base)}
    torch.manual_seed(0)
    baseline = detector(work).model
    result["train_samples_s_baseline"] = train_rate(baseline, train, PadTo128(collator), batch, steps, work / "ckpt")
    if epoch_compare:
        result.update(epochs(work, base, batch))
    return result


def repeat_rows(dataset, rows: int):
    """``dataset`` doubled until it has ``rows`` rows at least: enough for the steps at any size (the rows are
    read from memory-mapped Arrow either way)."""
    from datasets import concatenate_datasets

    while len(dataset) < rows:
        dataset = concatenate_datasets([dataset, dataset])
    return dataset


def train_rate(model, dataset, collator, batch: int, steps: int, out: Path) -> float:
    """Samples/s of Trainer steps after the first (which pays one-off start-up costs)."""
    marks = [m for m in run_trainer(model, dataset, collator, batch, out, steps=steps + 1) if m[1] >= 0]
    (t0, s0), (t1, s1) = marks[0], marks[-1]
    return (s1 - s0) * batch / (t1 - t0)


def run_trainer(model, dataset, collator, batch: int, out: Path, steps: int = 0, epochs: int = 0) -> list[tuple]:
    """Run the Trainer for ``steps`` steps or ``epochs`` epochs; (time, step) at the start of every epoch
    (step -1) and at the end of every step."""
    from transformers import Trainer, TrainerCallback

    marks = []

    class Clock(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), -1))

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), state.global_step))

    args = _training_args(out, batch, steps, epochs)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Clock()]).train()
    return marks


def _training_args(out: Path, batch: int, steps: int, epochs: int):
    """The train stage's settings that bear on speed; no checkpoints, evaluation or logging."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        learning_rate=2e-5,
        max_steps=steps or -1,
        num_train_epochs=epochs or 1,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        label_names=["labels_a", "labels_b"],
        disable_tqdm=True,
        bf16=cuda(),
        dataloader_pin_memory=cuda(),
        dataloader_num_workers=0,
    )


def epochs(work: Path, train, batch: int) -> dict:
    """One full fine-tuning epoch against one frozen-encoder epoch, as the train stage runs them: the whole
    detector on images and captions, or its heads (``DetectorHeads``) on cached features (``FeatureRows``).

    The epoch is timed from the Trainer's epoch start to its last step; the Trainer's own start-up (the same
    for both) and the one-off feature extraction are reported beside it."""
    import torch

    from aigid.core.data import Collator

    torch.manual_seed(0)
    full = detector(work)
    full_s, full_wall = _epoch(work, batch, full.model, train, Collator(full.tokenizer, full.processor, 64))
    torch.manual_seed(0)
    frozen_s, frozen_wall, extract = _frozen_epoch(work, train, batch)
    return {
        "epoch_s_full": full_s,
        "epoch_s_frozen": frozen_s,
        "epoch_wall_s_full": full_wall,
        "epoch_wall_s_frozen": frozen_wall,
        "feature_extraction_s": extract,
    }


def _frozen_epoch(work: Path, train, batch: int) -> tuple[float, float, float]:
    """The frozen-encoder epoch (as :func:`_epoch`) and the seconds of extracting the features it trains on."""
    from aigid.detector.cache import FeatureCollator, FeatureRows, feature_table
    from aigid.detector.infer import RunOptions, encode_features
    from aigid.detector.model import DetectorHeads

    frozen = detector(work)
    started = time.perf_counter()
    text, image = encode_features(frozen, train, RunOptions(batch_size=128))
    extract = time.perf_counter() - started
    features = feature_table(text, image, train)
    frozen.model.freeze_encoders()
    epoch_s, wall_s = _epoch(work, batch, DetectorHeads(frozen.model), FeatureRows(features), FeatureCollator())
    return epoch_s, wall_s, extract


def _epoch(work: Path, batch: int, model, dataset, collator) -> tuple[float, float]:
    """Seconds of one epoch, from its start to its last step, and with the Trainer's start-up."""
    started = time.perf_counter()
    marks = run_trainer(model, dataset, collator, batch, work / "ckpt", epochs=1)
    return marks[-1][0] - marks[0][0], marks[-1][0] - started
