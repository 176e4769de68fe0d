"""The `features` stage: encode every prepared row once with the starting encoders (frozen-encoder mode).

With ``train.freeze_encoders: true`` the encoders never change during training, so their outputs are computed
once here and cached as a DVC output (Arrow, memory-mapped): ``text_features`` (BERT [CLS]; for a fusion that
reads every token, ``model.fusion: cross_attention``, the feature of each of the caption's tokens, padding
dropped) and ``image_features`` (CLIP pooled) per row, aligned row by row with ``data/prepared``. `train`,
`pseudolabel` and `retrain` then only run the fusion layer and the heads: experiments on the threshold or the
heads are quick.
This is how the strongest CLIP-based detectors are trained (a frozen CLIP with a light head).

With ``train.freeze_encoders: false`` (full fine-tuning, the paper's setup) nothing is computed: the output is a
directory holding only ``features.json`` that says so, and the stages that read it ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aigid.core import stage
from aigid.detector.cache import compute_features

PARAMS = (
    "seed",
    "train.freeze_encoders",
    "train.num_workers",
    "model.max_text_length",
    "model.fusion",
    "features",
    "inference",
    "compute",
)


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
