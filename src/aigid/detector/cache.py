"""The feature cache of frozen-encoder mode: the starting encoders' outputs per prepared row, as Arrow tables.

:func:`compute_features` writes it (the `features` stage), with a ``features.json`` marker saying what was
cached; training and pseudo-labelling read it (:func:`open_features`, :class:`FeatureRows`,
:class:`FeatureCollator`) and run only the fusion layer and the heads on it (:func:`predict_from_features`).

Evaluation caches features per batch instead (:func:`predict_grid`): every condition of its grid (the images
perturbed, the captions blanked) is scored in one pass over the rows, each caption encoded once for all of
them, and detectors whose encoders are the same (:func:`shares_encoders`: frozen-encoder training) run their
heads on features encoded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict

from aigid.core.data import Collator, DataError, open_dataset, save_dataset
from aigid.core.errors import choice
from aigid.core.files import writing
from aigid.detector.infer import RunOptions, caption_order, iter_features
from aigid.detector.model import FUSIONS, Loaded, build_detector
from aigid.detector.runtime import autocast, configure, device

log = logging.getLogger(__name__)
MARKER = "features.json"


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.float32()), values.shape[1])


def _ragged(rows: list[np.ndarray]) -> pa.ListArray:
    """One (tokens, dim) array per row, as a list of fixed-size float lists per row."""
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), _fixed(np.concatenate(rows)))


def feature_table(text: np.ndarray | list[np.ndarray], image: np.ndarray, rows: Dataset) -> Dataset:
    """Encoder features of ``rows`` (in their order) with their labels: one split of `data/features`. ``text``
    holds a [CLS] feature per row, or a list of per-row token features."""
    text_column = _ragged(text) if isinstance(text, list) else _fixed(text)
    return Dataset(
        pa.table(
            {
                "text_features": text_column,
                "image_features": _fixed(image),
                "Label_A": pa.array(rows["Label_A"], pa.int64()),
                "Label_B": pa.array(rows["Label_B"], pa.int64()),
            }
        )
    )


def write_features(batches, rows: Dataset, path: Path) -> Dataset:
    """The features of ``batches`` (:func:`aigid.detector.infer.iter_features`: row indices, text and image
    features per batch, in any order that visits every row once) with the rows' labels, written to the Arrow file
    ``path`` one batch at a time and read back memory-mapped, in ``rows``' order: the same rows as
    :func:`feature_table` makes in memory."""
    labels_a, labels_b = np.asarray(rows["Label_A"]), np.asarray(rows["Label_B"])
    order, writer, digest = [], None, hashlib.sha256()
    with pa.OSFile(str(path), "wb") as sink:
        for indices, text, image in batches:
            batch = pa.record_batch(
                {
                    "text_features": _ragged(text) if isinstance(text, list) else _fixed(text),
                    "image_features": _fixed(image),
                    "Label_A": pa.array(labels_a[indices], pa.int64()),
                    "Label_B": pa.array(labels_b[indices], pa.int64()),
                }
            )
            writer = writer or pa.ipc.new_stream(sink, batch.schema)
            writer.write_batch(batch)
            order.append(indices)
            for column in batch.columns:
                for buffer in column.buffers():
                    if buffer is not None:
                        digest.update(buffer)
        if writer is None:
            raise DataError(f"no rows to encode for {path.stem}")
        writer.close()
    visited = np.concatenate(order)
    digest.update(visited.tobytes())
    # Named by its content, as an in-memory table is, not by the temporary file's path.
    fingerprint = digest.hexdigest()[:16]
    table = Dataset.from_file(str(path))
    if np.array_equal(visited, np.arange(len(visited))):
        return Dataset(table.data, info=table.info, fingerprint=fingerprint)
    where = np.empty_like(visited)  # back to the rows' order
    where[visited] = np.arange(len(visited))
    return table.select(where, new_fingerprint=fingerprint)


def compute_features(params, data_dir: Path, encoders_dir: Path, out_dir: Path) -> dict:
    if not params.train.freeze_encoders:
        save_dataset(
            DatasetDict(),
            out_dir,
            {MARKER: json.dumps({"computed": False, "reason": "train.freeze_encoders is false"}) + "\n"},
        )
        return {"computed": False}
    configure(params.compute)
    data = open_dataset(data_dir)
    torch.manual_seed(params.seed)
    # Only the encoders run here: the fusion layer and heads of this detector are placeholders, never used.
    detector = build_detector(
        str(encoders_dir / "text"),
        str(encoders_dir / "vision"),
        1,
        params.model.max_text_length,
        ("real", "ai"),
        precision=params.inference.precision,
    )
    options = RunOptions(params.features.batch_size, params.train.num_workers, progress=True)
    tokens = choice(FUSIONS, params.model.fusion, "model.fusion").tokens
    splits = {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Each split is written batch by batch to a file here, then saved in place: memory stays flat as rows grow.
    with writing(out_dir), tempfile.TemporaryDirectory(prefix=".features-", dir=out_dir.parent) as scratch:
        for name, ds in data.items():
            batches = iter_features(detector, ds, options, tokens=tokens)
            splits[name] = write_features(batches, ds, Path(scratch) / f"{name}.arrow")
            log.info("encoded %d %s rows", len(ds), name)
        info = {MARKER: json.dumps({"computed": True, "tokens": tokens}) + "\n"}
        save_dataset(DatasetDict(splits), out_dir, info)
    first = splits[next(iter(splits))].with_format("numpy")[0]
    return {
        "computed": True,
        "tokens": tokens,
        "rows": {k: len(v) for k, v in splits.items()},
        "text_dim": int(first["text_features"].shape[-1]),
        "image_dim": int(first["image_features"].shape[-1]),
    }


def open_features(path: Path, fusion: str | None = None) -> DatasetDict:
    """The cached features, or a clear error when the `features` stage ran without freeze_encoders or, given the
    ``fusion`` that will read them, cached other text features than it reads ([CLS] or every token)."""
    marker = path / MARKER
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    if not info.get("computed"):
        raise DataError(
            f"{path}: no cached features; train.freeze_encoders is true, so run the `features` stage "
            f"with it (dvc repro does)"
        )
    if fusion is not None and info.get("tokens", False) != choice(FUSIONS, fusion, "model.fusion").tokens:
        cached = "every token's feature" if info.get("tokens") else "the [CLS] feature only"
        raise DataError(
            f"{path}: holds {cached} of each caption, not what model.fusion: {fusion} reads; run the "
            f"`features` stage with model.fusion: {fusion} (dvc repro does)"
        )
    return open_dataset(path).with_format("numpy")


FEATURE_COLUMNS = ("text_features", "image_features", "Label_A", "Label_B")


class FeatureRows(torch.utils.data.Dataset):
    """Cached features for a DataLoader, still read from memory-mapped Arrow: a batch of indices is one take
    over the table, converted column by column to tensors (no per-row dicts to split and re-stack)."""

    def __init__(self, feats: Dataset):
        self.feats = feats.with_format("arrow")

    def __len__(self) -> int:
        return len(self.feats)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        table = self.feats[indices]
        out = {}
        for name in FEATURE_COLUMNS:
            column = table.column(name).combine_chunks()
            if pa.types.is_list(column.type):  # token features: padded, with the mask of the real ones
                lengths = column.value_lengths().to_numpy().tolist()
                out[name], out["text_mask"] = pad(list(torch.split(_tensor(column.flatten()), lengths)))
            else:
                out[name] = _tensor(column)
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[0] for name, value in self.__getitems__([index]).items()}


def _tensor(column: pa.Array) -> torch.Tensor:
    if isinstance(column, pa.FixedSizeListArray):  # one row of floats per sample
        values = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    else:
        values = column.to_numpy()
    return torch.tensor(values)  # a copy: Arrow's buffers are read-only


def pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (tokens, dim) features as one zero-padded (rows, longest, dim) tensor and its 0/1 mask."""
    lengths = torch.tensor([len(r) for r in rows])
    mask = (torch.arange(int(lengths.max()) if len(rows) else 0) < lengths[:, None]).long()
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), mask


class FeatureCollator:
    """A batch of cached features to model inputs (frozen-encoder training): the batch that
    :meth:`FeatureRows.__getitems__` returns, or a list of rows from any other dataset of features."""

    def __call__(self, batch: dict[str, torch.Tensor] | list[dict]) -> dict[str, torch.Tensor]:
        if isinstance(batch, list):
            rows = batch
            batch = {
                name: torch.as_tensor(np.stack([np.asarray(r[name]) for r in rows]))
                for name in FEATURE_COLUMNS
                if name != "text_features"
            }
            text = [torch.as_tensor(np.asarray(r["text_features"], dtype=np.float32)) for r in rows]
            if text and text[0].dim() == 2:  # token features
                batch["text_features"], batch["text_mask"] = pad(text)
            else:
                batch["text_features"] = torch.stack(text)
        out = {
            "text_features": batch["text_features"],
            "image_features": batch["image_features"],
            "labels_a": batch["Label_A"],
            "labels_b": batch["Label_B"],
        }
        if "text_mask" in batch:
            out["text_mask"] = batch["text_mask"]
        return out


@torch.inference_mode()
def predict_from_features(model, feats: Dataset, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Head logits for cached features (no encoder runs)."""
    model, rows = model.eval(), FeatureRows(feats)
    logits_a, logits_b = [], []
    for start in range(0, len(feats), batch_size):
        batch = rows.__getitems__(list(range(start, min(start + batch_size, len(feats)))))
        out = model(
            text_features=batch["text_features"],
            image_features=batch["image_features"],
            text_mask=batch.get("text_mask"),
        )
        logits_a.append(out.logits_a.float().numpy())
        logits_b.append(out.logits_b.float().numpy())
    return np.concatenate(logits_a), np.concatenate(logits_b)


@dataclass(frozen=True)
class Condition:
    """One way the rows are shown to a detector in :func:`predict_grid`: each decoded image through ``perturb``
    first (None: as stored), every caption replaced by "" with ``blank``."""

    name: str
    perturb: Callable | None = None
    blank: bool = False


def shares_encoders(a: Loaded, b: Loaded) -> bool:
    """Whether two detectors turn every input into the same features: the same tokenizer, image processor,
    caption length, precision, text feature ([CLS] or every token) and encoder weights, as frozen-encoder
    training leaves them (train and retrain start from the same encoders and never change them)."""
    ma, mb = a.model, b.model
    same = (
        a.precision == b.precision
        and ma.config.max_text_length == mb.config.max_text_length
        and ma.fusion.tokens == mb.fusion.tokens
        and ma.config.text_encoder_config == mb.config.text_encoder_config
        and ma.config.vision_encoder_config == mb.config.vision_encoder_config
        and a.processor.to_dict() == b.processor.to_dict()
        and _tokenizer_state(a.tokenizer) == _tokenizer_state(b.tokenizer)
    )
    if not same:
        return False
    for encoder_a, encoder_b in ((ma.text_encoder, mb.text_encoder), (ma.vision_encoder, mb.vision_encoder)):
        wa, wb = encoder_a.state_dict(), encoder_b.state_dict()
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


def _tokenizer_state(tokenizer) -> tuple:
    """What a tokenizer turns text into: a fast tokenizer's whole pipeline (as JSON), without the truncation and
    padding a call sets on it (each call sets its own: a tokenizer that has encoded a batch is still the same)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return type(tokenizer).__name__, tokenizer.get_vocab()
    state = json.loads(backend.to_str())
    state.pop("truncation", None), state.pop("padding", None)
    return type(tokenizer).__name__, json.dumps(state, sort_keys=True)


@torch.inference_mode()
def predict_grid(
    detectors: dict[str, Loaded], dataset, conditions: list[Condition], options: RunOptions, desc: str = "scoring"
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Head A and head B logits of every detector under every condition, for every row in the dataset's order:
    ``out[condition.name][detector name]``, float32 numpy. One pass over the rows, in batches visited in
    caption order as :func:`aigid.detector.infer.predict_logits` visits them: per batch, the captions are encoded
    once (and once blanked, where a condition blanks them), the images once per condition that perturbs them,
    and each detector's fusion and heads read those features. The same numbers as one
    :func:`~aigid.detector.infer.predict_logits` pass per detector and condition: the same batches go through
    the same encoders. Several detectors must share their encoders (:func:`shares_encoders`): the first one's
    encode for all. A progress bar on stderr (``options.progress``) counts rows x conditions scored."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    first = next(iter(detectors.values()))
    if any(not shares_encoders(first, other) for other in list(detectors.values())[1:]):
        raise ValueError("predict_grid: the detectors do not share their encoders; score them one at a time")
    dev = device()
    encoder = first.model.to(dev).eval()
    heads = {name: d.model.to(dev).eval() for name, d in detectors.items()}
    tokens = encoder.fusion.tokens
    length = encoder.config.max_text_length
    collators = {c.name: Collator(first.tokenizer, first.processor, length, perturb=c.perturb) for c in conditions}
    order = caption_order(dataset)
    loader = DataLoader(
        Subset(dataset, order.tolist()),
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.num_workers,
        collate_fn=list,  # the rows: each condition's inputs are made from them in turn, so one is in memory
    )
    chunks = {c.name: {name: ([], []) for name in detectors} for c in conditions}
    bar = tqdm(total=len(dataset) * len(conditions), desc=desc, unit="image", disable=not options.progress)
    with bar, autocast(dev, first.precision):
        for rows in loader:
            captions = collators[conditions[0].name](rows)  # the captions' inputs (and the first condition's images)
            texts = {False: captions}
            if any(c.blank for c in conditions):
                texts[True] = collators[conditions[0].name]([{**row, "Caption": ""} for row in rows])
            encoded = {
                blank: encoder.encode_text(
                    inputs["input_ids"].to(dev), inputs["attention_mask"].to(dev), _optional(inputs, dev), tokens
                )
                for blank, inputs in texts.items()
            }
            images: dict = {}
            for c in conditions:
                if c.perturb not in images:
                    pixels = captions["pixel_values"] if c is conditions[0] else collators[c.name].images(rows)
                    images[c.perturb] = encoder.vision_encoder(pixel_values=pixels.to(dev)).pooler_output
                mask = texts[c.blank]["attention_mask"].to(dev) if tokens else None
                for name, model in heads.items():
                    out = model(text_features=encoded[c.blank], image_features=images[c.perturb], text_mask=mask)
                    chunks[c.name][name][0].append(out.logits_a.float().cpu().numpy())
                    chunks[c.name][name][1].append(out.logits_b.float().cpu().numpy())
                bar.update(len(rows))
    return {
        condition: {name: tuple(_in_order(parts, order) for parts in pair) for name, pair in per_model.items()}
        for condition, per_model in chunks.items()
    }


def _optional(inputs: dict, dev) -> torch.Tensor | None:
    token_type_ids = inputs.get("token_type_ids")
    return None if token_type_ids is None else token_type_ids.to(dev)


def _in_order(parts: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    """Batches visited in ``order``, concatenated and put back in the dataset's order."""
    values = np.concatenate(parts)
    restored = np.empty_like(values)
    restored[order] = values
    return restored
