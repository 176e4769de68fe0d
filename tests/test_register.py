"""`aigid register` (aigid.tools.register): registering the current model is idempotent, and a version carries
the exported form and the model card. A real sqlite MLflow store and a tiny detector."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from aigid.cli import main
from aigid.serving.registry import ALIAS
from helpers import (
    CARD,
    NAME,
    REPO,
    _candidate,
    _register,
    _versions,
    environment,
    mlflow_server,
)


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
    from aigid.tools import models

    monkeypatch.setenv("AIGID_CACHE", str(tmp_path / "cache"))
    _register(store, 0.4)
    torch_dir, portable_dir = models.download_registered(f"models:/{NAME}@{ALIAS}")
    assert torch_dir.is_relative_to(store / "mlruns") and portable_dir.is_relative_to(store / "mlruns")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow  # an `mlflow server`
def test_a_registered_version_is_downloaded_once_and_a_moved_alias_is_followed(served, monkeypatch, tmp_path):
    from aigid.tools import models

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
    first = models.download_registered(uri)
    assert models.download_registered(uri) == first and downloads == [f"models:/{NAME}/1"]
    assert first[0].is_relative_to(tmp_path / "cache" / "models")
    assert (first[0] / "model.safetensors").is_file() and (first[1] / "model.onnx").is_file()

    _register(store, 0.3)  # a new version takes the alias
    second = models.download_registered(uri)
    assert downloads == [f"models:/{NAME}/1", f"models:/{NAME}/2"] and second != first
    assert second[0].relative_to(tmp_path / "cache" / "models").parts[0].startswith(f"{NAME}-v2-")
    assert models.download_registered(f"models:/{NAME}/1") == first and len(downloads) == 2


@pytest.mark.slow  # an `mlflow server`
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


# ------------------------------------------------------------------ the cache checks what it downloaded


@pytest.fixture(scope="module")
def on_server(tmp_path_factory, tiny_models):
    """The tiny model registered once in an `mlflow server` on 127.0.0.1 (artifacts proxied to a folder of its own)
    for the tests below, which only read it; yields the working directory, which holds a.png."""
    root = tmp_path_factory.mktemp("served")
    for name in ("model", "portable"):
        shutil.copytree(tiny_models / name, root / name)
    (root / "model_card.md").write_text(CARD)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    Image.new("RGB", (20, 20), (10, 200, 30)).save(root / "a.png")
    with mlflow_server(root / "served.db", str(root / "served-artifacts"), environment()) as (uri, _):
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(root)
            patch.setenv("MLFLOW_TRACKING_URI", uri)
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment("aigid")
            _register(root, 0.4)
        yield root, uri


def _detect() -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["detect", "a.png", "--model", f"models:/{NAME}@{ALIAS}", "--format", "json"])
    return result.exit_code, result.stdout, result.stderr


def _altered_a_little(copy: Path) -> None:
    """One weight of the exported graph moved by 0.05: it loads, and scores a little differently."""
    import onnx
    from onnx import numpy_helper

    (graph,) = copy.rglob("model.onnx")
    model = onnx.load(graph)
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.05
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, graph)


def _altered_a_lot(copy: Path) -> None:
    (graph,) = copy.rglob("model.onnx")
    graph.write_bytes(graph.read_bytes()[:1000])


def _portable_deleted(copy: Path) -> None:
    (graph,) = copy.rglob("model.onnx")
    shutil.rmtree(graph.parent)


def _emptied(copy: Path) -> None:
    for item in copy.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()


@pytest.mark.slow  # an `mlflow server`
@pytest.mark.parametrize("damage", [_altered_a_little, _altered_a_lot, _portable_deleted, _emptied])
def test_a_damaged_cached_copy_is_downloaded_again(on_server, damage, monkeypatch, tmp_path, caplog):
    root, uri = on_server
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("AIGID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("aigid.serving.scorer.gpu_present", lambda: False)
    first = _detect()
    assert first[0] == 0 and "the exported detector" in first[2], first
    (copy,) = (tmp_path / "cache" / "models").iterdir()
    damage(copy)
    again = _detect()
    assert again[:2] == first[:2] and "the exported detector" in again[2]  # the same rows, the same model
    assert f"{copy}: the cached copy of models:/{NAME}/1 " in caplog.text and "downloading it again" in caplog.text
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [copy.name]
    from aigid.tools.models import check_copy

    assert check_copy(copy) is None


@pytest.mark.slow  # an `mlflow server`
def test_a_copy_that_does_not_match_its_registered_weights_stops_with_one_line(served, monkeypatch, tmp_path):
    """The store's own files altered after registration: the download does not hash to the version's
    weights_hash tag. Nothing is kept, and the error names the folder."""
    monkeypatch.setenv("AIGID_CACHE", str(tmp_path / "cache"))
    _register(served, 0.4)
    Image.new("RGB", (20, 20), (10, 200, 30)).save(served / "a.png")
    assert _detect()[0] == 0
    (copy,) = (tmp_path / "cache" / "models").iterdir()
    (stored,) = [p for p in (served / "served-artifacts").rglob("model.safetensors") if p.parent.name == "detector"]
    stored.write_bytes(stored.read_bytes() + b"\0")
    _emptied(copy)
    code, out, err = _detect()
    assert code == 1 and out == "" and "Traceback" not in err, err
    assert err.strip().splitlines()[-1:] == [  # after MLflow's download progress
        f"Error: {copy}: models:/{NAME}/1 as downloaded is not what was registered (its torch detector does not "
        f"hash to the version's weights_hash tag); nothing was kept"
    ]
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# --------------------------------------------------------------------- names as MLflow takes them


def _name(store, name: str) -> None:
    params = yaml.safe_load((store / "params.yaml").read_text())
    params["mlflow"]["registered_model"] = name
    (store / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.parametrize("name", ["o'brien", 'the "best" one'])
def test_any_name_mlflow_accepts_is_registered_once_and_promoted(store, name):
    """Names are looked up as values, never pasted into a search filter: quotes are ordinary characters."""
    _name(store, name)
    for _ in range(2):
        _register(store, 0.4)
    client = mlflow.MlflowClient()
    (version,) = [v for v in client.search_model_versions() if v.name == name]
    assert version.status == "READY" and client.get_model_version_by_alias(name, ALIAS).version == version.version
    promoted = CliRunner().invoke(main, ["promote"])
    assert promoted.exit_code == 0 and f"{name} version 1 promoted to @champion" in promoted.output
    Image.new("RGB", (20, 20), (10, 200, 30)).save(store / "a.png")
    scored = CliRunner().invoke(main, ["detect", "a.png", "--model", f"models:/{name}@champion"])
    assert scored.exit_code == 0, scored.output


@pytest.mark.parametrize("name", ["team/detector", "team:detector", "..detector", "  "])
def test_a_name_mlflow_refuses_is_one_line_at_the_params_check(store, name):
    _name(store, name)
    result = CliRunner().invoke(main, ["promote"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output == (
        f"Error: params.yaml: mlflow: registered_model {name!r}: MLflow's model registry refuses a name that is "
        f"blank, holds '/' or ':', is '.' or starts with '..'\n"
    )
