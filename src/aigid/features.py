"""The `features` stage: encode every prepared row once with the starting encoders (frozen-encoder mode).

With ``train.freeze_encoders: true`` the encoders never change during training, so their outputs are computed
once here and cached as a DVC output (Arrow, memory-mapped): ``text_features`` (BERT [CLS]) and
``image_features`` (CLIP pooled) per row, aligned row by row with ``data/prepared``. `train`, `pseudolabel` and
`retrain` then only run the fusion layer and the heads: experiments on the threshold or the heads cost seconds.
This is how the strongest CLIP-based detectors are trained (a frozen CLIP with a light head).

With ``train.freeze_encoders: false`` (full fine-tuning, the paper's setup) nothing is computed: the output is a
directory holding only ``features.json`` that says so, and the stages that read it ignore it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict

from . import stage
from .data import DataError, open_dataset, save_dataset
from .infer import RunOptions, encode_features
from .model import build_detector
from .runtime import configure

log = logging.getLogger(__name__)
MARKER = "features.json"
PARAMS = ("seed", "train.freeze_encoders", "train.num_workers", "model.max_text_length", "features", "inference")


@dataclass(frozen=True)
class Paths:
    data: Path = stage.path("data/prepared", "Prepared dataset: every split is encoded.", exists=True)
    encoders: Path = stage.path("models/encoders", "Starting encoders written by the encoders stage.", exists=True)
    out: Path = stage.path("data/features", "Directory for the cached features (Arrow, one row per prepared row).")


def run(params, paths: Paths) -> dict:
    """Cache the starting encoders' text and image features (train.freeze_encoders: true).

    With train.freeze_encoders: false, OUT only records that no features were computed.
    """
    return compute_features(params, paths.data, paths.encoders, paths.out)


command = stage.command("features", run, Paths, PARAMS)


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.float32()), values.shape[1])


def feature_table(text: np.ndarray, image: np.ndarray, rows: Dataset) -> Dataset:
    """Encoder features of ``rows`` (in their order) with their labels: one split of `data/features`."""
    return Dataset(pa.table({"text_features": _fixed(text), "image_features": _fixed(image),
                             "Label_A": pa.array(rows["Label_A"], pa.int64()),
                             "Label_B": pa.array(rows["Label_B"], pa.int64())}))


def compute_features(params, data_dir: Path, encoders_dir: Path, out_dir: Path) -> dict:
    if not params.train.freeze_encoders:
        save_dataset(DatasetDict(), out_dir, {MARKER: json.dumps({"computed": False, "reason":
                                                                  "train.freeze_encoders is false"}) + "\n"})
        return {"computed": False}
    configure()
    data = open_dataset(data_dir)
    torch.manual_seed(params.seed)
    # Only the encoders run here: the fusion layer and heads of this detector are placeholders, never used.
    detector = build_detector(str(encoders_dir / "text"), str(encoders_dir / "vision"), 1,
                              params.model.max_text_length, ("real", "ai"))
    options = RunOptions(params.features.batch_size, params.train.num_workers, params.inference.precision)
    splits = {}
    for name, ds in data.items():
        text, image = encode_features(detector, ds, options)
        splits[name] = feature_table(text, image, ds)
        log.info("encoded %d %s rows", len(ds), name)
    save_dataset(DatasetDict(splits), out_dir, {MARKER: json.dumps({"computed": True}) + "\n"})
    return {"computed": True, "rows": {k: len(v) for k, v in splits.items()},
            "text_dim": int(text.shape[1]), "image_dim": int(image.shape[1])}


def open_features(path: Path) -> DatasetDict:
    """The cached features, or a clear error when the `features` stage ran without freeze_encoders."""
    marker = path / MARKER
    if not marker.is_file() or not json.loads(marker.read_text()).get("computed"):
        raise DataError(f"{path}: no cached features; train.freeze_encoders is true, so run the `features` stage "
                        f"with it (dvc repro does)")
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
        return {name: _tensor(table.column(name).combine_chunks()) for name in FEATURE_COLUMNS}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[0] for name, value in self.__getitems__([index]).items()}


def _tensor(column: pa.Array) -> torch.Tensor:
    if isinstance(column, pa.FixedSizeListArray):  # one row of floats per sample
        values = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    else:
        values = column.to_numpy()
    return torch.tensor(values)  # a copy: Arrow's buffers are read-only


class FeatureCollator:
    """A batch of cached features to model inputs (frozen-encoder training): the batch that
    :meth:`FeatureRows.__getitems__` returns, or a list of rows from any other dataset of features."""

    def __call__(self, batch: dict[str, torch.Tensor] | list[dict]) -> dict[str, torch.Tensor]:
        if isinstance(batch, list):
            batch = {name: torch.as_tensor(np.stack([np.asarray(r[name]) for r in batch]))
                     for name in FEATURE_COLUMNS}
        return {"text_features": batch["text_features"], "image_features": batch["image_features"],
                "labels_a": batch["Label_A"], "labels_b": batch["Label_B"]}


@torch.inference_mode()
def predict_from_features(model, feats: Dataset, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Head logits for cached features (no encoder runs)."""
    model = model.eval()
    logits_a, logits_b = [], []
    for start in range(0, len(feats), batch_size):
        rows = feats[start:start + batch_size]
        out = model(text_features=torch.as_tensor(rows["text_features"]),
                    image_features=torch.as_tensor(rows["image_features"]))
        logits_a.append(out.logits_a.float().numpy())
        logits_b.append(out.logits_b.float().numpy())
    return np.concatenate(logits_a), np.concatenate(logits_b)
