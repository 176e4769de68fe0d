"""`aigid register` (aigid.serving.register): registering the current model is idempotent, and a version carries
the exported form and the model card. A real sqlite MLflow store and a tiny detector."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from click.testing import CliRunner
from PIL import Image

from aigid.cli import main
from aigid.serving.registry import ALIAS
from helpers import CARD, NAME, _candidate, _register, _versions


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
