"""Training under faults: killed mid-run it resumes; with its tracking store away it fails before any work;
against a real MLflow server it logs there."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from helpers import aigid, environment, finish, free_port, mlflow_server, tiny_params_dict

pytestmark = pytest.mark.slow


def last_complete_checkpoint_in(root: Path):
    from aigid.training.trainer import is_complete

    for checkpoint in (root / "checkpoints").glob("train/*/checkpoint-*"):
        if is_complete(checkpoint, checkpoint.parent.name, 1):  # the folder is named by the fingerprint
            return checkpoint
    return None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    params = tiny_params_dict()
    params["train"]["epochs"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw").mkdir(parents=True)  # the raw data folder prepare depends on
    finish(aigid("prepare", cwd=root))
    finish(aigid("encoders", cwd=root))
    return root


def test_sigkill_mid_training_then_rerun_resumes_and_matches_an_unbroken_run(inputs, tmp_path):
    finish(aigid("train", "--out", "models/unbroken", "--metrics", "unbroken.json", "--history", "h1.json", cwd=inputs))
    assert not (inputs / "checkpoints").exists()  # cleaned when the stage completes

    proc = aigid("train", "--out", "models/killed", "--metrics", "killed.json", "--history", "h2.json", cwd=inputs)
    deadline = time.time() + 300
    while last_complete_checkpoint_in(inputs) is None and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (inputs / "models/killed").exists() and not (inputs / "killed.json").exists()

    out = finish(
        aigid("train", "--out", "models/killed", "--metrics", "killed.json", "--history", "h2.json", cwd=inputs)
    )
    assert "resuming train from the last checkpoint" in out
    unbroken = json.loads((inputs / "unbroken.json").read_text())
    resumed = json.loads((inputs / "killed.json").read_text())
    assert resumed == pytest.approx(unbroken)
    h1, h2 = (json.loads((inputs / name).read_text()) for name in ("h1.json", "h2.json"))
    assert len(h1) == len(h2) == 4
    for epoch_unbroken, epoch_resumed in zip(h1, h2):
        assert epoch_resumed == pytest.approx(epoch_unbroken)


def test_unreachable_tracking_server_fails_before_any_training(inputs):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.time()
    proc = aigid("train", "--out", "models/never", "--metrics", "never.json", cwd=inputs, MLFLOW_TRACKING_URI=uri)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and f"MLflow tracking server {uri} is not reachable" in out
    assert "Traceback" not in out and time.time() - started < 60
    assert not (inputs / "models/never").exists() and not (inputs / "checkpoints").exists()


def test_unusable_sqlite_store_fails_before_any_training(inputs, tmp_path):
    # MLflow creates a missing directory for a sqlite file, so the store is placed under a regular file instead.
    (tmp_path / "not-a-dir").write_text("")
    uri = f"sqlite:///{tmp_path / 'not-a-dir' / 'mlflow.db'}"
    proc = aigid("train", "--out", "models/never", "--metrics", "never.json", cwd=inputs, MLFLOW_TRACKING_URI=uri)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and f"MLflow tracking store {uri} is not usable" in out
    assert "Traceback" not in out
    assert not (inputs / "models/never").exists() and not (inputs / "checkpoints").exists()


def test_training_logs_to_a_real_mlflow_server(inputs, tmp_path):
    import mlflow

    with mlflow_server(tmp_path / "server.db", str(tmp_path / "artifacts"), environment()) as (uri, _):
        finish(
            aigid(
                "train",
                "--out",
                "models/served",
                "--metrics",
                "served.json",
                "--history",
                "h3.json",
                cwd=inputs,
                MLFLOW_TRACKING_URI=uri,
            )
        )
        mlflow.set_tracking_uri(uri)
        (run,) = mlflow.search_runs(experiment_names=["aigid"], output_format="list")
        assert run.data.tags["stage"] == "train" and run.data.params["train.epochs"] == "4"
        assert {"f1_weighted_a", "f1_weighted_b", "history/f1_weighted_a"} <= set(run.data.metrics)
