"""Shared fixtures: the real code on a tiny configuration (small encoders, a few dozen generated images)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The tests run stages in this process too: params.yaml's compute profile is set before anything imports torch,
# as the `aigid` command line sets it before a stage's module is imported (aigid.core.compute).
from aigid.core import compute  # noqa: E402

compute.apply(REPO / "params.yaml")

# The committed params.yaml, shrunk: same keys, smaller numbers.
TINY = {
    "prepare": {"demo": {"captions": {"train": 24, "validation": 6, "test": 8, "unlabeled": 10}, "image_size": 32}},
    "encoders": {
        "demo": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 300, "image_size": 32, "patch_size": 8}
    },
    "model": {"fusion_dim": 32},
    "train": {"epochs": 2, "batch_size": 32, "learning_rate": 0.002},
    "threshold": 0.2,  # a barely trained tiny model is never confident; keep some samples anyway
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def tiny_params_dict() -> dict:
    return _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)


@pytest.fixture
def tiny_params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A working directory with a sqlite MLflow store (experiment aigid), the committed params.yaml and a tiny
    detector in ``model``."""
    import mlflow

    from test_detect import save_tiny_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("aigid")
    save_tiny_model(tmp_path / "model")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(cmd: list[str], ready_url: str, **popen):
    """Run a server process until the block ends: ready once ``ready_url`` answers (within 3 minutes); stopped
    with its children (the process group) afterwards. Its output goes to a file (a pipe nobody reads would
    fill up and stall the server), shown when it does not start."""
    import tempfile

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(ready_url, timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        log.seek(0)
                        raise AssertionError(f"{' '.join(cmd[:3])} did not start:\n{log.read().decode()}") from None
                    time.sleep(0.5)
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(db: Path, artifacts: str, env: dict[str, str], port: int | None = None):
    """`mlflow server` on 127.0.0.1 (a free port unless given) with a sqlite backend at ``db`` and artifacts proxied
    to ``artifacts`` (a directory or an s3:// URL), run with ``env``; yields its URI and process."""
    import sys

    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", artifacts]
    with local_server(cmd, f"{uri}/health", env=env) as proc:
        yield uri, proc


# Credentials of the test S3 server (moto accepts any; these are the ones the tests pass and check for).
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


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


def make_bucket(endpoint: str, name: str) -> str:
    """Create bucket ``name`` on the S3 server at ``endpoint``; returns ``s3://name``."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_KEYS["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=name)
    return f"s3://{name}"
