"""params.yaml, read once into typed, validated dataclasses.

Every value is checked at start-up; a wrong one stops the stage with a message naming the key. The resolved
values are logged to MLflow as they are (see :func:`flatten`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """A params.yaml value is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class DemoDataParams:
    captions: dict[str, int] = field(
        default_factory=lambda: {"train": 200, "validation": 40, "test": 80, "unlabeled": 100})
    image_size: int = 64


CT2_CLASSES = ["real", "sd21", "sdxl", "sd3", "dalle3", "midjourney6"]
CT2_ALIASES = {"coco": "real", "coco_image": "real", "sd21_image": "sd21", "sdxl_image": "sdxl",
               "sd3_image": "sd3", "dalle_image": "dalle3", "dalle": "dalle3", "midjourney_image": "midjourney6",
               "midjourney": "midjourney6"}
# Inference precision (inference.precision, `aigid detect --precision`), applied by aigid.runtime.autocast:
#   auto: bf16 autocast on CUDA, float32 on the CPU (the numbers CPU training produced)
#   bf16: bf16 autocast on any device; on a CPU with bf16 instructions (AVX512-BF16, AMX) about twice the
#         float32 speed of the paper-size encoders
#   fp32: float32 everywhere
PRECISIONS = ("auto", "bf16", "fp32")
LAYOUTS = ("auto", "hub", "arrow", "parquet", "competition", "folders")


@dataclass(frozen=True)
class PrepareParams:
    # "demo" generates the embedded dataset; otherwise a Hugging Face dataset id or a local directory whose
    # layout is detected (or named in `layout`): arrow (save_to_disk), parquet, competition, folders.
    source: str = "demo"
    layout: str = "auto"
    validation_fraction: float = 0.15  # of captions, when the source has no validation split
    test_fraction: float = 0.15        # of captions, when the source has no test split
    class_names: list[str] = field(default_factory=lambda: list(CT2_CLASSES))   # Label_B index -> name
    class_aliases: dict[str, str] = field(default_factory=lambda: dict(CT2_ALIASES))  # folder -> class name
    on_bad: str = "error"              # error: stop at the first bad row | skip: leave it out, report it
    max_pixels: int = 89_478_485       # larger images are refused (decompression-bomb guard)
    max_side: int = 0                  # > 0: images larger than this are stored resized (shortest side)
    demo: DemoDataParams = field(default_factory=DemoDataParams)


@dataclass(frozen=True)
class DemoEncoderParams:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    vocab_size: int = 1000
    image_size: int = 64
    patch_size: int = 8


@dataclass(frozen=True)
class EncodersParams:
    text: str = "demo"      # "demo", a hub name (bert-base-uncased) or a local directory
    vision: str = "demo"    # "demo", a hub name (openai/clip-vit-base-patch32) or a local directory
    demo: DemoEncoderParams = field(default_factory=DemoEncoderParams)


@dataclass(frozen=True)
class ModelParams:
    fusion_dim: int = 512
    max_text_length: int = 64


@dataclass(frozen=True)
class TrainParams:
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    batch_size: int = 256
    epochs: int = 8
    warmup_ratio: float = 0.0
    num_workers: int = 0
    # Frozen-encoder mode: the `features` stage encodes every image and caption once with the starting
    # encoders; only the fusion layer and the heads are trained, on those cached features.
    freeze_encoders: bool = False
    # Training only: each sample's caption is replaced by "" with this probability, so the model also works
    # on images that come without a caption (`aigid detect` without --caption). 0 disables it.
    caption_dropout: float = 0.1
    # Leave-one-generator-out: "none", or a class name whose rows train/retrain drop from train and validation
    # (evaluate then reports that generator's detection rate as `unseen_generator`).
    holdout: str = "none"


@dataclass(frozen=True)
class FeaturesParams:
    batch_size: int = 128          # inference batch of the `features` stage (frozen-encoder mode only)


@dataclass(frozen=True)
class PseudolabelParams:
    pool: str = "unlabeled"          # split that is pseudo-labelled: "unlabeled" or "test" (as the paper did)
    validation_fraction: float = 0.2  # the paper's 8:2 train/validation split of the kept samples
    batch_size: int = 128


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 128
    target_fpr: float = 0.05   # operating point: at most this false-positive rate on real validation images
    # Robustness grid on the test split: JPEG re-encoding quality, Gaussian blur sigma, resize factor.
    jpeg_quality: list[int] = field(default_factory=lambda: [95, 75, 50])
    blur_sigma: list[float] = field(default_factory=lambda: [1.0, 2.0])
    resize_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])


@dataclass(frozen=True)
class InferenceParams:
    precision: str = "auto"   # of features, pseudolabel and evaluate: auto | bf16 | fp32 (see PRECISIONS)


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "aigid"
    registered_model: str = "aigid-detector"   # evaluate registers the retrained model under this name


@dataclass(frozen=True)
class Params:
    threshold: float = 0.8
    seed: int = 42
    prepare: PrepareParams = field(default_factory=PrepareParams)
    encoders: EncodersParams = field(default_factory=EncodersParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    features: FeaturesParams = field(default_factory=FeaturesParams)
    pseudolabel: PseudolabelParams = field(default_factory=PseudolabelParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    inference: InferenceParams = field(default_factory=InferenceParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def __post_init__(self):
        _check(0.0 < self.threshold < 1.0, "threshold", self.threshold, "a number strictly between 0 and 1")
        p = self.prepare
        _check(0.0 < p.validation_fraction < 1.0, "prepare.validation_fraction", p.validation_fraction,
               "a number strictly between 0 and 1")
        for split, n in p.demo.captions.items():
            _check(isinstance(n, int) and n >= 1, f"prepare.demo.captions.{split}", n, "a positive integer")
        _check("train" in p.demo.captions, "prepare.demo.captions", p.demo.captions, "a mapping with a train split")
        _check(p.layout in LAYOUTS, "prepare.layout", p.layout, " or ".join(map(repr, LAYOUTS)))
        _check(0.0 < p.test_fraction < 1.0, "prepare.test_fraction", p.test_fraction,
               "a number strictly between 0 and 1")
        _check(len(p.class_names) >= 2 and p.class_names[0] == "real" and len(set(p.class_names)) == len(p.class_names),
               "prepare.class_names", p.class_names, "a list of unique names starting with 'real' (Label_B 0)")
        for alias, name in p.class_aliases.items():
            _check(name in p.class_names, f"prepare.class_aliases.{alias}", name, "one of prepare.class_names")
        _check(p.on_bad in ("error", "skip"), "prepare.on_bad", p.on_bad, "'error' or 'skip'")
        _check(p.max_pixels >= 1, "prepare.max_pixels", p.max_pixels, "a positive integer")
        _check(p.max_side >= 0, "prepare.max_side", p.max_side, "an integer >= 0 (0 keeps images as they are)")
        _check(p.demo.image_size >= 16, "prepare.demo.image_size", p.demo.image_size, "an integer >= 16")
        d = self.encoders.demo
        _check(d.hidden_size % d.heads == 0, "encoders.demo.hidden_size", d.hidden_size,
               f"a multiple of encoders.demo.heads ({d.heads})")
        _check(d.image_size % d.patch_size == 0, "encoders.demo.image_size", d.image_size,
               f"a multiple of encoders.demo.patch_size ({d.patch_size})")
        for key in ("hidden_size", "layers", "heads", "vocab_size", "image_size", "patch_size"):
            _check(getattr(d, key) >= 1, f"encoders.demo.{key}", getattr(d, key), "a positive integer")
        _check(self.model.fusion_dim >= 1, "model.fusion_dim", self.model.fusion_dim, "a positive integer")
        _check(self.model.max_text_length >= 4, "model.max_text_length", self.model.max_text_length, "an integer >= 4")
        t = self.train
        _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "a positive number")
        _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
        _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "a positive integer")
        _check(t.epochs >= 1, "train.epochs", t.epochs, "a positive integer")
        _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "a number in [0, 1)")
        _check(t.num_workers >= 0, "train.num_workers", t.num_workers, "an integer >= 0")
        _check(self.features.batch_size >= 1, "features.batch_size", self.features.batch_size, "a positive integer")
        _check(0 <= t.caption_dropout < 1, "train.caption_dropout", t.caption_dropout, "a number in [0, 1)")
        _check(t.holdout == "none" or t.holdout in p.class_names[1:], "train.holdout", t.holdout,
               "'none' or one of the generators in prepare.class_names")
        q = self.pseudolabel
        _check(q.pool in ("unlabeled", "test"), "pseudolabel.pool", q.pool, "'unlabeled' or 'test'")
        _check(0 < q.validation_fraction < 1, "pseudolabel.validation_fraction", q.validation_fraction,
               "a number strictly between 0 and 1")
        _check(q.batch_size >= 1, "pseudolabel.batch_size", q.batch_size, "a positive integer")
        e = self.evaluate
        _check(e.batch_size >= 1, "evaluate.batch_size", e.batch_size, "a positive integer")
        _check(0 < e.target_fpr < 1, "evaluate.target_fpr", e.target_fpr, "a number strictly between 0 and 1")
        for i, q in enumerate(e.jpeg_quality):
            _check(1 <= q <= 100, f"evaluate.jpeg_quality[{i}]", q, "an integer from 1 to 100")
        for i, sigma in enumerate(e.blur_sigma):
            _check(sigma > 0, f"evaluate.blur_sigma[{i}]", sigma, "a positive number")
        for i, scale in enumerate(e.resize_scale):
            _check(scale > 0, f"evaluate.resize_scale[{i}]", scale, "a positive number")
        _check(self.inference.precision in PRECISIONS, "inference.precision", self.inference.precision,
               " or ".join(map(repr, PRECISIONS)))


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ParamsError(f"params.yaml: {key} must be {expected}, got {value!r}")


def _coerce(cls, raw: Any, prefix: str):
    """Build dataclass ``cls`` from a mapping, converting and checking each field's type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: {prefix or 'top level'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(f"params.yaml: unknown key {where}{unknown[0]} (known: {', '.join(sorted(fields))})")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(f.type, raw[name], key)
    return cls(**values)


_NESTED = {
    "DemoDataParams": DemoDataParams, "PrepareParams": PrepareParams, "DemoEncoderParams": DemoEncoderParams,
    "EncodersParams": EncodersParams, "ModelParams": ModelParams, "TrainParams": TrainParams, "FeaturesParams": FeaturesParams,
    "PseudolabelParams": PseudolabelParams, "EvaluateParams": EvaluateParams, "InferenceParams": InferenceParams,
    "MlflowParams": MlflowParams,
}


def _convert(type_name: str, value: Any, key: str):
    if type_name in _NESTED:
        return _coerce(_NESTED[type_name], value, key)
    if type_name == "float":
        # YAML 1.1 readers see "2e-5" as a string; accept any numeric spelling, refuse anything else.
        if isinstance(value, bool):
            raise ParamsError(f"params.yaml: {key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ParamsError(f"params.yaml: {key} must be a number, got {value!r}") from None
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ParamsError(f"params.yaml: {key} must be true or false, got {value!r}")
        return value
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params.yaml: {key} must be an integer, got {value!r}")
        return value
    if type_name == "str":
        if not isinstance(value, str) or not value:
            raise ParamsError(f"params.yaml: {key} must be a non-empty string, got {value!r}")
        return value
    if type_name in ("list[str]", "list[int]", "list[float]"):
        if not isinstance(value, list):
            raise ParamsError(f"params.yaml: {key} must be a list, got {value!r}")
        return [_convert(type_name[5:-1], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if type_name == "dict[str, str]":
        if not isinstance(value, dict):
            raise ParamsError(f"params.yaml: {key} must be a mapping, got {value!r}")
        return {str(k): _convert("str", v, f"{key}.{k}") for k, v in value.items()}
    if type_name == "dict[str, int]":
        if not isinstance(value, dict):
            raise ParamsError(f"params.yaml: {key} must be a mapping, got {value!r}")
        for k, v in value.items():
            _convert("int", v, f"{key}.{k}")
        return dict(value)
    raise AssertionError(f"unhandled field type {type_name} for {key}")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    return _coerce(Params, raw, "")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for logging, e.g. {"train.learning_rate": 2e-05}."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
