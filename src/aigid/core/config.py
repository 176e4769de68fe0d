"""params.yaml, read once into typed, validated pydantic models.

params.yaml is the only place values live: every key must be present (an empty or partial file is refused,
naming the missing keys), unknown keys are refused with a did-you-mean, and a wrong value stops the stage
with a message naming its dotted key. Each stage reads only the keys it declares (its ``PARAMS``, the same
list as its ``params:`` in dvc.yaml); :func:`view` gives the stage exactly those, as pydantic models, and
:meth:`View.declared` the values it logs to MLflow and fingerprints its checkpoints with.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from aigid.core.compute import DEVICES
from aigid.core.errors import ParamsError
from aigid.core.precision import Precision


class Group(BaseModel):
    # strict: a value has the type its key declares, as YAML reads it. `true` is not the number 1, "8" and 8.0 are
    # not the count 8, 1 is not `true`; an int is a float (`learning_rate: 1`). Numbers are finite.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DemoData(Group):
    captions: dict[str, int] = Field(
        description="captions per split of the generated dataset (one image per class each); needs train"
    )
    image_size: int = Field(ge=16, description="side of the generated images, pixels")

    @model_validator(mode="after")
    def _splits(self):
        if "train" not in self.captions:
            raise ValueError("needs a train split")
        if any(n < 1 for n in self.captions.values()):
            raise ValueError("every split needs at least one caption")
        return self


class Prepare(Group):
    source: str = Field(
        min_length=1,
        description="demo | a Hugging Face dataset id | a local directory under "
        "the raw data folder (data/raw), tracked by DVC",
    )
    revision: str = Field(
        min_length=1,
        description="hub sources: the dataset revision (commit hash or tag) "
        "that is loaded; ignored for demo and local sources",
    )
    layout: str = Field(
        description="auto (told from the files), hub, or how a local source is laid out: a name in "
        "aigid.sources.readers.LAYOUTS (checked by prepare)"
    )
    validation_fraction: float = Field(
        gt=0, lt=1, description="share of captions moved to validation when the source has no validation split"
    )
    test_fraction: float = Field(
        gt=0, lt=1, description="share of captions moved to test when the source has no test split"
    )
    class_names: list[str] = Field(min_length=2, description="Label_B index -> class name; index 0 is real")
    class_aliases: dict[str, str] = Field(
        description="folder name -> class name (competition source folders *_image, class folders)"
    )
    on_bad: Literal["error", "skip"] = Field(
        description="error: stop at the first bad row | skip: leave it out and list it in the quarantine report"
    )
    max_pixels: int = Field(ge=1, description="larger images are refused (decompression-bomb guard)")
    max_side: int = Field(ge=0, description="> 0: images whose shorter side is larger are stored resized to it")
    demo: DemoData

    @model_validator(mode="after")
    def _classes(self):
        names = self.class_names
        if names[0] != "real" or len(set(names)) != len(names):
            raise ValueError("class_names must be unique and start with 'real' (Label_B 0)")
        for alias, name in self.class_aliases.items():
            if name not in names:
                raise ValueError(f"class_aliases.{alias}: {name!r} is not one of class_names {names}")
        return self


class DemoEncoders(Group):
    hidden_size: int = Field(ge=1)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    image_size: int = Field(ge=1)
    patch_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _shapes(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of heads ({self.heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size ({self.patch_size})")
        return self


class Encoders(Group):
    text: str = Field(min_length=1, description="demo | hub name (bert-base-uncased) | local directory")
    vision: str = Field(min_length=1, description="demo | hub name (openai/clip-vit-base-patch32) | local directory")
    demo: DemoEncoders

    @model_validator(mode="after")
    def _both_or_neither(self):
        if (self.text == "demo") != (self.vision == "demo"):
            raise ValueError("text and vision must both be 'demo' or neither")
        return self


class Model(Group):
    fusion: str = Field(
        description="a name in aigid.detector.model.FUSIONS (checked where it is used): concat, [CLS] and image "
        "features concatenated (the paper) | cross_attention, the image feature attends over the caption's tokens"
    )
    fusion_dim: int = Field(ge=1, description="width of the shared space after the fusion")
    max_text_length: int = Field(ge=4, description="captions longer than this are truncated (padding is per batch)")


class Train(Group):
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    batch_size: int = Field(ge=1, description="the global batch, shared by the processes of a launch")
    epochs: int = Field(ge=1)
    warmup_ratio: float = Field(ge=0, lt=1)
    num_workers: int = Field(ge=0, description="DataLoader worker processes")
    freeze_encoders: bool = Field(description="true: cache the encoders' features once, train the heads only")
    caption_dropout: float = Field(ge=0, lt=1, description="training only: a caption becomes '' with this probability")
    holdout: str = Field(min_length=1, description="none | a generator left out of train/validation")


class Features(Group):
    batch_size: int = Field(ge=1, description="inference batch of the features stage (frozen-encoder mode)")


class Pseudolabel(Group):
    pool: Literal["unlabeled", "test"] = Field(description="the split that is pseudo-labelled")
    selection: Literal["threshold", "class_balanced"] = Field(
        description="threshold: every sample whose confidences exceed `threshold` (the paper) | class_balanced: "
        "of those, per predicted class the most confident up to a quota, so that the kept samples "
        "have the class mix of the labelled train split"
    )
    validation_fraction: float = Field(gt=0, lt=1, description="share of kept captions that go to validation")
    batch_size: int = Field(ge=1)
    min_precision: float = Field(
        ge=0,
        le=1,
        description="a warning when the estimated share of right kept labels (the keep rule on the labelled "
        "validation split) falls below this, on either task; 0 never warns",
    )


class Verdict(Group):
    target_fpr: float = Field(
        gt=0,
        lt=1,
        description="the threshold (operating point): at most this share of real validation images called AI",
    )
    target_fnr: float = Field(
        gt=0, lt=1, description="the lower threshold: at most this share of AI validation images called real"
    )


class Evaluate(Group):
    batch_size: int = Field(ge=1)
    robustness: dict[str, list[float]] = Field(
        description="robustness grid: perturbation -> its values (aigid.stages.evaluate.PERTURBATIONS, checked "
        "by evaluate)"
    )
    format_control_quality: int = Field(
        ge=1,
        le=100,
        description="format-controlled test: every test image "
        "re-encoded as JPEG at this quality, so the file format says nothing "
        "about the label",
    )


class Inference(Group):
    precision: Precision = Field(description="features, pseudolabel and evaluate: auto | bf16 | fp32")


class Compute(Group):
    device: Literal[DEVICES] = Field(description="cpu | auto (a GPU when there is one: faster, other numbers)")
    threads: int = Field(
        ge=0,
        description="CPU threads of every stage (the numbers depend on it); 0: one per "
        "core, so the numbers follow the machine's core count",
    )
    reproducible: bool = Field(
        description="pin the CPU's instruction sets (AVX2) and MKL's code path, and use "
        "deterministic algorithms: the same numbers on any x86-64 with AVX2"
    )


class Mlflow(Group):
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1, description="evaluate registers the retrained model under this name")

    @model_validator(mode="after")
    def _a_name_mlflow_takes(self):
        # The names MLflow's model registry refuses (a sqlite store and `mlflow server` alike); any other works.
        name = self.registered_model
        if not name.strip() or "/" in name or ":" in name or name == "." or name.startswith(".."):
            raise ValueError(
                f"registered_model {name!r}: MLflow's model registry refuses a name that is blank, holds '/' or "
                f"':', is '.' or starts with '..'"
            )
        return self


class Params(Group):
    threshold: float = Field(
        gt=0, lt=1, description="pseudo-labelling keeps samples whose Task A and Task B confidences both exceed this"
    )
    seed: int
    prepare: Prepare
    encoders: Encoders
    model: Model
    train: Train
    features: Features
    pseudolabel: Pseudolabel
    verdict: Verdict
    evaluate: Evaluate
    inference: Inference
    compute: Compute
    mlflow: Mlflow

    @model_validator(mode="after")
    def _holdout(self):
        if self.train.holdout != "none" and self.train.holdout not in self.prepare.class_names[1:]:
            raise ValueError(
                f"train.holdout must be 'none' or a generator of prepare.class_names, got {self.train.holdout!r}"
            )
        return self


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return model


def _message(err: ValidationError, path: Path) -> str:
    errors = err.errors()
    missing = [_dotted(e["loc"]) for e in errors if e["type"] == "missing"]
    if missing:
        return (
            f"{path}: missing key(s) {', '.join(missing)}; params.yaml must set every key "
            f"(copy them from the committed params.yaml)"
        )
    e = errors[0]
    key = _dotted(e["loc"])
    if e["type"] == "extra_forbidden":
        parent = _model_at(e["loc"][:-1])
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
        hint = f"did you mean {_dotted((*e['loc'][:-1], close[0]))}?" if close else f"known: {', '.join(known)}"
        return f"{path}: unknown key {key} ({hint})"
    where = f"{key}: " if key else ""
    got = "" if e["type"].startswith("value_error") else f", got {e['input']!r}"
    return f"{path}: {where}{e['msg'].removeprefix('Value error, ')}{got}"


class _Loader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml (YAML 1.2): a number with an exponent and no dot (``2e-5``) is a number, not
    the string PyYAML's YAML 1.1 rules make of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{path}: empty or not a mapping of keys; params.yaml must set every key "
            f"(copy them from the committed params.yaml)"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_message(err, path)) from None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys, e.g. {"train.learning_rate": 2e-05}."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


def declared(params: Params, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of the declared ``keys`` (groups or dotted keys), flattened: what a stage logs and
    fingerprints."""
    return {k: v for k, v in flatten(params).items() if any(_covers(d, k) for d in keys)}


class UndeclaredKey(ParamsError, AttributeError):
    """A stage read a params key it does not declare (an AttributeError too, so ``hasattr`` answers False)."""


class View(BaseModel):
    """A stage's params: the pydantic models of the keys it declares, in params.yaml's order, and nothing else.

    A stage runs on ``view(params, PARAMS)``: a whole group (``train``) is params.yaml's own model
    (:class:`Train`), a dotted key (``prepare.source``) a view of that group with the one field. Reading a key
    outside the declared list raises :class:`UndeclaredKey`, so the list in dvc.yaml (checked against
    ``PARAMS`` by a test) cannot silently fall behind the code.
    """

    model_config = ConfigDict(frozen=True)
    scope: ClassVar[str] = ""  # the dotted prefix of a group's view ("prepare.")
    keys: ClassVar[tuple[str, ...]] = ()  # what the stage declared

    def __getattr__(self, name: str):  # only reached for a name the view does not have
        if name.startswith("_"):
            return super().__getattr__(name)
        raise UndeclaredKey(
            f"this stage reads params key {self.scope}{name}, which it does not declare "
            f"(declared: {', '.join(self.keys)}); add it to the stage's PARAMS and dvc.yaml"
        )

    def declared(self) -> dict[str, Any]:
        """The declared keys and their values, flattened: what the stage logs and fingerprints."""
        return flatten(self, self.scope)


@functools.cache
def view_model(keys: tuple[str, ...], model: type[BaseModel] = Params, scope: str = "") -> type[View]:
    """The :class:`View` model of ``keys`` within ``model`` (the fields of ``scope``)."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = scope + name
        if any(_covers(d, key) for d in keys):
            fields[name] = (info.annotation, info)
        elif any(d.startswith(key + ".") for d in keys):
            fields[name] = (view_model(keys, info.annotation, key + "."), ...)
    cls = create_model(f"{model.__name__}View", __base__=View, **fields)
    cls.scope, cls.keys = scope, keys
    return cls


def view(params: BaseModel, keys: tuple[str, ...]) -> View:
    """``params`` as the stage that declares ``keys`` sees them (no copy of the values, no validation again)."""
    return _fill(view_model(tuple(keys)), params)


def _fill(cls: type[View], obj: BaseModel) -> View:
    values = {}
    for name, info in cls.model_fields.items():
        value, sub = getattr(obj, name), info.annotation
        values[name] = _fill(sub, value) if isinstance(sub, type) and issubclass(sub, View) else value
    return cls.model_construct(**values)
