"""The retrained detector as an MLflow model: logged with a signature and an input example, registered by name.

Registration is idempotent and keyed by the model's content: :func:`register` adds a version only when no
version of the name holds the same model: the same ``model_hash`` tag (SHA-256 of the model directory's files
and the threshold it labels at), or the same files (``weights_hash``) at a ``threshold`` within a relative
1e-5 (:data:`THRESHOLD_RTOL`: an evaluation of the same weights elsewhere can end one float32 step away). It
tags a new version with those, the git commit and the DVC experiment, and points the alias ``@candidate`` at
it. `evaluate` calls it when it runs; ``aigid register`` (:mod:`aigid.tools.register`) calls it for the current
``models/retrained`` whenever a store lacks it (a fresh clone whose evaluate DVC skipped, a second machine
after ``dvc pull``, a shared server). An existing version is never registered twice and never moves the
alias: clones sharing one server do not move each other's ``@candidate`` back to an older model. The run that
registers a version holds its test metrics (DVC keys) and its test split as a dataset: what `aigid promote`
(:mod:`aigid.tools.promote`) compares before moving ``@champion``.

The model is logged from code (:mod:`aigid.serving.pyfunc`, which documents its input and output); the model
directory travels as an artifact (``model_dir``) with its exported form (``portable_dir``, what a CPU scores
with), each with the model card as its ``README.md``; the aigid package as code, the operating-point threshold as
model config. The card is the version's description too.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd

from aigid.tracking.metrics import headline
from aigid.tracking.runs import log_results

log = logging.getLogger(__name__)
ALIAS = "candidate"
HASH_TAG, WEIGHTS_TAG, THRESHOLD_TAG = "model_hash", "weights_hash", "threshold"
# Thresholds this close are one operating point: the threshold is a validation score, and scoring the same weights
# on other hardware or with other threads can move it by a float32 step (1.2e-7 relative).
THRESHOLD_RTOL = 1e-5
CARD_FILE = "README.md"  # the model card, in each directory of a registered model


@dataclass(frozen=True)
class Identity:
    """What makes two registered models one: see :func:`identity`."""

    model_hash: str
    weights_hash: str
    threshold: float


def content_hash(model_dir: Path, threshold: float) -> str:
    """SHA-256 over the threshold the registered model labels at and the model directory's files (relative
    paths and bytes): the same model at the same operating point, the same hash."""
    return identity(model_dir, threshold).model_hash


def identity(model_dir: Path, threshold: float) -> Identity:
    """The model's hash with its threshold (:func:`content_hash`), the hash of its files alone
    (:func:`weights_hash`), the threshold."""
    with_threshold, files = hashlib.sha256(repr(float(threshold)).encode()), hashlib.sha256()
    for part in _content(model_dir):
        with_threshold.update(part)
        files.update(part)
    return Identity(with_threshold.hexdigest(), files.hexdigest(), float(threshold))


def weights_hash(model_dir: Path) -> str:
    """SHA-256 of the model directory's files (the ``weights_hash`` tag): the same for the directory registered
    and for the one downloaded from the registry, whose README.md is the model card."""
    files = hashlib.sha256()
    for part in _content(model_dir):
        files.update(part)
    return files.hexdigest()


def _content(model_dir: Path):
    """What the hashes are over: each file's relative path and bytes, in path order. A README.md is the model
    card, not the model: registration writes the card there (:func:`_with_card`)."""
    for file in sorted(f for f in Path(model_dir).rglob("*") if f.is_file()):
        name = file.relative_to(model_dir).as_posix()
        if name == CARD_FILE:
            continue
        yield name.encode() + b"\0"
        with file.open("rb") as f:
            yield from iter(functools.partial(f.read, 1 << 20), b"")


def find_version(name: str, key: Identity) -> str | None:
    """The oldest version of ``name`` holding this model, if any: the same ``model_hash``, or the same files at a
    threshold within :data:`THRESHOLD_RTOL`."""
    found = _tagged(name, HASH_TAG, key.model_hash)
    found += [
        v
        for v in _tagged(name, WEIGHTS_TAG, key.weights_hash)
        if math.isclose(float(v.tags.get(THRESHOLD_TAG, "nan")), key.threshold, rel_tol=THRESHOLD_RTOL)
    ]
    return min((str(v.version) for v in found), key=int, default=None)


def _tagged(name: str, tag: str, digest: str) -> list:
    """The versions of ``name`` whose ``tag`` is ``digest``. Only the hex digest goes into the search filter; the
    name, any string MLflow accepts (quotes included), is compared as a value."""
    found = mlflow.MlflowClient().search_model_versions(f"tags.{tag} = '{digest}'")
    return [v for v in found if v.name == name]


def log_report(report: dict, parent: bool = False) -> None:
    """An evaluate report in the active run: its DVC metrics (``retrained.task_a.f1_weighted``, also on the
    pipeline's parent run with ``parent``) and the whole report as the artifact ``report.json``."""
    log_results(headline(report), parent=parent)
    mlflow.log_dict(report, "report.json")


@dataclass(frozen=True)
class Extras:
    """What travels with a registered detector besides its directory: its exported form and its model card."""

    portable: Path | None = None
    card: str = ""


def register(model_dir: Path, name: str, threshold: float, test, extras: Extras = Extras()) -> tuple[str, bool]:
    """Log ``model_dir`` to the active run and register it under ``name`` with the alias @candidate, unless a
    version with the same content exists. Returns the version and whether this call created it."""
    key = identity(model_dir, threshold)
    existing = find_version(name, key)
    if existing is not None:
        return existing, False
    return register_new(model_dir, name, threshold, test, key, extras)


def register_new(
    model_dir: Path, name: str, threshold: float, test, key: Identity, extras: Extras = Extras()
) -> tuple[str, bool]:
    """Log and register a model no version holds yet (``key``), tag it and give it @candidate."""
    info = log_detector(model_dir, name, threshold, test[0]["Image"]["bytes"], test[0]["Caption"], extras)
    client, created = mlflow.MlflowClient(), str(info.registered_model_version)
    if extras.card:
        client.update_model_version(name, created, description=description(extras.card))
    tags = mlflow.active_run().data.tags
    for tag, value in (
        (HASH_TAG, key.model_hash),
        (THRESHOLD_TAG, repr(key.threshold)),
        (WEIGHTS_TAG, key.weights_hash),
        ("git_commit", tags.get("git_commit", "")),
        ("dvc_exp_name", tags.get("dvc_exp_name", "")),
    ):
        client.set_model_version_tag(name, created, tag, value)
    # Two clones registering the same model at once: the oldest version stays, the other is removed.
    oldest = find_version(name, key)
    if oldest != created:
        client.delete_model_version(name, created)
        return oldest, False
    client.set_registered_model_alias(name, ALIAS, created)
    log.info("registered %s as %s version %s (@%s)", model_dir, name, created, ALIAS)
    return created, True


REQUIREMENTS = (
    "mlflow",
    "onnxruntime",
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "safetensors",
    "datasets",
    "pillow",
    "numpy",
    "pandas",
    "scikit-learn",
    "pyyaml",
    "pydantic",
    "click",
)


# The longest description a registry backend stores (MLflow's SQL schema: 5000 characters).
DESCRIPTION_LIMIT = 5000


def description(card: str) -> str:
    """The model card as a version's description; a longer card ends with where the whole one is."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    tail = "\n\n(The whole card is the README.md of the model's artifacts.)"
    return card[: DESCRIPTION_LIMIT - len(tail)].rsplit("\n", 1)[0] + tail


def _with_card(directory: Path, card: str, into: Path) -> Path:
    """``directory``'s files linked (copied across file systems) into ``into``, with the card as README.md
    (in place of the directory's own, which a link would let the card overwrite)."""
    into.mkdir()
    for file in sorted(Path(directory).iterdir()):
        if file.is_file() and not (card and file.name == CARD_FILE):
            try:
                os.link(file, into / file.name)
            except OSError:
                shutil.copy2(file, into / file.name)
    if card:
        (into / CARD_FILE).write_text(card)
    return into


def log_detector(
    model_dir: Path,
    registered_name: str,
    threshold: float,
    example_image: bytes,
    example_caption: str = "",
    extras: Extras = Extras(),
):
    """Log ``model_dir`` (and its exported form) to the active run as a pyfunc model (the code in
    :mod:`aigid.serving.pyfunc`) and register it as a new version of the name."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    from aigid.serving import pyfunc

    example = pd.DataFrame({"image": [base64.b64encode(example_image).decode()], "caption": [example_caption]})
    model = pyfunc.DetectorModel()
    model.load(model_dir)
    output = model.predict(None, example)
    # A request may leave the caption out: the input example has one, the signature does not require it.
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "caption", required=False)])
    signature = ModelSignature(inputs=inputs, outputs=infer_signature(example, output).outputs)
    with tempfile.TemporaryDirectory(prefix="aigid-register-") as tmp:
        artifacts = {"model_dir": str(_with_card(model_dir, extras.card, Path(tmp) / "detector"))}
        if extras.portable is not None:
            artifacts["portable_dir"] = str(_with_card(extras.portable, extras.card, Path(tmp) / "portable"))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc.__file__,
            artifacts=artifacts,
            code_paths=[str(Path(__file__).parent)],
            model_config={"threshold": threshold},
            signature=signature,
            input_example=example,
            registered_model_name=registered_name,
            # Explicit pins: inferring requirements would load and run the model once more, slowly.
            pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
        )
