"""Shared fixtures: the real code on a tiny configuration (small encoders, a few dozen generated images). The
plain helpers they use, and the test modules share, are in helpers.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

# The tests run stages in this process too: params.yaml's compute profile is set before anything imports torch,
# as the `aigid` command line sets it before a stage's module is imported (aigid.core.compute).
from aigid.core import compute

compute.apply(Path(__file__).resolve().parents[1] / "params.yaml")

from helpers import (  # noqa: E402
    CARD,
    REPO,
    aigid,
    export_portable,
    finish,
    free_port,
    local_server,
    save_tiny_model,
    sh,
    tiny_params_dict,
)


@pytest.fixture(autouse=True, scope="session")
def model_cache(tmp_path_factory):
    """Registered versions that tests download are kept in a folder of the session, not in the user's cache."""
    os.environ["AIGID_CACHE"] = str(tmp_path_factory.mktemp("aigid-cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """The tiny detector as save_tiny_model saves it, in ``model``, and its exported form, in ``portable``: made
    once for the session, as exporting takes seconds. Tests read them in place, or copy them to change them."""
    root = tmp_path_factory.mktemp("tiny-models")
    save_tiny_model(root / "model")
    export_portable(root / "model", root / "portable")
    return root


@pytest.fixture
def store(tmp_path, monkeypatch, tiny_models):
    """A working directory with a sqlite MLflow store (experiment aigid), the committed params.yaml, a tiny
    detector in ``model``, its exported form in ``portable`` and a model card in ``model_card.md``."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("aigid")
    for name in ("model", "portable"):
        shutil.copytree(tiny_models / name, tmp_path / name)
    (tmp_path / "model_card.md").write_text(CARD)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server (moto's server mode) on 127.0.0.1 and a free port, for this module's tests; yields
    its endpoint URL. Buckets are made by the tests (``boto3`` against the endpoint, or ``aws s3 mb``-alike)."""
    import shutil
    import sys

    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with local_server([exe, "-H", "127.0.0.1", "-p", str(port)], f"{endpoint}/moto-api/"):
        yield endpoint


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC repository holding this project's pipeline, its code and a tiny params.yaml."""
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", ".gitignore", "data/raw/README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = tiny_params_dict()
    params["train"]["holdout"] = "sd3"  # leave-one-generator-out, so evaluate reports an unseen generator
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh("git", "config", "user.email", "ci@example.com", cwd=root)
    sh("git", "config", "user.name", "ci", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")  # after `dvc init`, which writes its own
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "tiny pipeline", cwd=root)
    sh("dvc", "repro", cwd=root)
    return root


# Session-wide: the frozen-mode tests of several modules (features, cache, train, pseudolabel) only read it.
@pytest.fixture(scope="session")
def frozen(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("frozen")
    params = tiny_params_dict()
    params["train"]["freeze_encoders"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw").mkdir(parents=True)  # the raw data folder prepare depends on
    for stage in ("prepare", "encoders", "features", "train", "pseudolabel", "retrain"):
        finish(aigid(stage, cwd=root))
    return root
