"""`aigid register` (aigid.serving.register): registering the current model is idempotent, and a version carries
the exported form and the model card. A real sqlite MLflow store and a tiny detector."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from PIL import Image

from aigid.cli import main
from aigid.serving.registry import ALIAS
from helpers import CARD, NAME, _candidate, _register, _versions, environment, mlflow_server


def test_register_command_is_idempotent(store):
    for _ in range(2):
        _register(store, 0.4)
    (version,) = _versions()
    assert _candidate() == str(version.version)
    run = mlflow.get_run(version.run_id)
    assert run.data.tags["stage"] == "register" and run.data.metrics["retrained.roc_auc"] == 0.95
    (test,) = run.inputs.dataset_inputs  # the test split it was scored on, as a dataset
    assert test.dataset.name.endswith("prepared:test") and len(test.dataset.digest) == 36
    assert mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}").metadata.get_model_info() is not None


def test_a_registered_version_carries_its_exported_form_and_card_and_detect_scores_with_the_quicker(store, monkeypatch):
    from aigid.serving import scorer

    monkeypatch.setattr(scorer, "gpu_present", lambda: False)
    _register(store, 0.4)
    (version,) = _versions()
    assert version.description == CARD
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/{version.version}", dst_path="got")
    for part in ("detector", "portable"):
        (found,) = [p for p in Path(local).rglob("README.md") if p.parent.name == part]
        assert found.read_text() == CARD and (found.parent / "scoring.json").is_file()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(store / "a.png")
    uri = f"models:/{NAME}@{ALIAS}"
    registered = CliRunner().invoke(main, ["detect", "a.png", "--model", uri, "--format", "json"])
    assert registered.exit_code == 0, registered.output
    assert "portable (the exported detector: the quickest on a CPU" in registered.stderr
    torch_model = CliRunner().invoke(main, ["detect", "a.png", "--model", "model", "--format", "json"])
    torch_rows = json.loads(torch_model.stdout)
    (row,) = json.loads(registered.stdout)
    assert abs(row["prob_ai"] - torch_rows[0]["prob_ai"]) < 1e-5 and row["verdict"] == torch_rows[0]["verdict"]


@pytest.fixture
def served(store, monkeypatch):
    """The registry behind `mlflow server` on 127.0.0.1 (artifacts proxied to a folder of its own): a store on
    another machine, as a team's, whose files a client downloads."""
    with mlflow_server(store / "served.db", str(store / "served-artifacts"), environment()) as (uri, _):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("aigid")
        yield store


def test_a_store_on_this_machine_is_read_in_place(store, monkeypatch, tmp_path):
    from aigid.serving import detect

    monkeypatch.setenv("AIGID_CACHE", str(tmp_path / "cache"))
    _register(store, 0.4)
    torch_dir, portable_dir = detect.download_registered(f"models:/{NAME}@{ALIAS}")
    assert torch_dir.is_relative_to(store / "mlruns") and portable_dir.is_relative_to(store / "mlruns")
    assert not (tmp_path / "cache").exists()


def test_a_registered_version_is_downloaded_once_and_a_moved_alias_is_followed(served, monkeypatch, tmp_path):
    from aigid.serving import detect

    store = served
    monkeypatch.setenv("AIGID_CACHE", str(tmp_path / "cache"))
    downloads = []
    real_download = mlflow.artifacts.download_artifacts

    def counted(**kwargs):
        downloads.append(kwargs["artifact_uri"])
        return real_download(**kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counted)
    _register(store, 0.4)
    uri = f"models:/{NAME}@{ALIAS}"
    first = detect.download_registered(uri)
    assert detect.download_registered(uri) == first and downloads == [f"models:/{NAME}/1"]
    assert first[0].is_relative_to(tmp_path / "cache" / "models")
    assert (first[0] / "model.safetensors").is_file() and (first[1] / "model.onnx").is_file()

    _register(store, 0.3)  # a new version takes the alias
    second = detect.download_registered(uri)
    assert downloads == [f"models:/{NAME}/1", f"models:/{NAME}/2"] and second != first
    assert second[0].relative_to(tmp_path / "cache" / "models").parts[0].startswith(f"{NAME}-v2-")
    assert detect.download_registered(f"models:/{NAME}/1") == first and len(downloads) == 2


def test_a_download_cut_short_leaves_nothing_that_looks_finished(served, monkeypatch, tmp_path):
    monkeypatch.setenv("AIGID_CACHE", str(tmp_path / "cache"))
    _register(served, 0.4)
    Image.new("RGB", (20, 20), (10, 200, 30)).save(served / "a.png")

    def cut_short(artifact_uri, dst_path):
        (Path(dst_path) / "detector").mkdir()
        (Path(dst_path) / "detector" / "model.safetensors").write_bytes(b"half")
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", cut_short)
    result = CliRunner().invoke(main, ["detect", "a.png", "--model", f"models:/{NAME}@{ALIAS}"])
    assert result.exit_code == 1 and "cannot download the model" in result.output
    assert "connection reset by peer" in result.output and "Traceback" not in result.output
    assert list((tmp_path / "cache" / "models").iterdir()) == []

    (tmp_path / "file").write_text("")  # a cache that cannot be made: the error names it and the way out
    monkeypatch.setenv("AIGID_CACHE", str(tmp_path / "file"))
    result = CliRunner().invoke(main, ["detect", "a.png", "--model", f"models:/{NAME}@{ALIAS}"])
    assert result.exit_code == 1, result.output
    assert f"cannot keep the downloaded model in {tmp_path / 'file' / 'models'}" in result.output
    assert "set AIGID_CACHE" in result.output and "Traceback" not in result.output
