"""aigid.tracking.runs in isolation, against a real MLflow store (sqlite): the rule that puts each stage run under
its pipeline execution's parent, and the content digest of a logged split (the grouping under a real `dvc repro`,
`dvc exp run --temp` and two clones on one server is in test_pipeline.py and test_tracking_server.py)."""

from pathlib import Path

import mlflow
import pytest
from datasets import Dataset, DatasetDict

from aigid.core.config import load_params, view
from aigid.tracking.runs import FINGERPRINT_TAG, log_data, stage_run
from helpers import REPO, sh


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (each test works in repositories of its own)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def workspace(tmp_path, monkeypatch, store) -> Path:
    """A git repository holding the committed params.yaml, tracked in the module's store."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for cmd in (("git", "init", "-q"), ("git", "add", "-A")):
        sh(*cmd, cwd=root)
    sh("git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "params", cwd=root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return root


def _stage(root: Path, stage: str, monkeypatch, experiment: str | None = None, dvc: bool = True) -> str:
    """Run ``stage`` in ``root`` as DVC runs it (DVC_ROOT, and DVC_EXP_NAME for an experiment); its parent's id."""
    monkeypatch.chdir(root)
    if dvc:
        monkeypatch.setenv("DVC_ROOT", str(root))
    else:
        monkeypatch.delenv("DVC_ROOT", raising=False)
    if experiment is not None:
        monkeypatch.setenv("DVC_EXP_NAME", experiment)
    with stage_run(stage, view(load_params(root / "params.yaml"), ("mlflow",))) as run:
        run_id = run.info.run_id
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == stage
    return run.data.tags.get("mlflow.parentRunId")


def _parent(run_id: str):
    return mlflow.MlflowClient().get_run(run_id)


def test_a_stage_joins_its_pipelines_latest_parent_unless_it_already_ran_there(workspace, monkeypatch):
    first = _stage(workspace, "train", monkeypatch)
    assert _stage(workspace, "evaluate", monkeypatch) == first  # the next stage of the same `dvc repro`
    again = _stage(workspace, "train", monkeypatch)  # the same commit reproduced again (`dvc repro -f`)
    assert again not in (None, first)
    assert _stage(workspace, "evaluate", monkeypatch) == again
    commit = sh("git", "rev-parse", "--short=7", "HEAD", cwd=workspace).strip()
    for parent in map(_parent, (first, again)):
        assert parent.info.run_name == f"repro-{commit}-{parent.data.tags['pipeline_id'][:8]}"
        assert parent.info.status == "FINISHED" and parent.data.params["mlflow.experiment"] == "aigid"
    assert _parent(first).info.run_name != _parent(again).info.run_name


def test_another_experiment_value_commit_or_clone_is_another_parent(workspace, monkeypatch, tmp_path):
    seen = {_stage(workspace, "train", monkeypatch)}
    experiment = _stage(workspace, "train", monkeypatch, experiment="bushy-lamb")
    assert _parent(experiment).info.run_name.startswith("bushy-lamb-")
    seen.add(experiment)
    monkeypatch.setenv("DVC_EXP_NAME", "")
    (workspace / "params.yaml").write_text((workspace / "params.yaml").read_text() + "\n# edited\n")
    seen.add(_stage(workspace, "train", monkeypatch))  # another value of params.yaml
    sh("git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qam", "edit", cwd=workspace)
    seen.add(_stage(workspace, "train", monkeypatch))  # another commit
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(workspace), str(clone), cwd=tmp_path)
    seen.add(_stage(clone, "train", monkeypatch))  # another workspace of the same commit
    assert None not in seen and len(seen) == 5


def test_a_stage_outside_dvc_stands_alone(workspace, monkeypatch):
    assert _stage(workspace, "train", monkeypatch, dvc=False) is None


def _saved(path: Path, captions: list[str]) -> DatasetDict:
    data = DatasetDict(
        {"test": Dataset.from_dict({"Caption": captions}), "train": Dataset.from_dict({"Caption": ["x"]})}
    )
    data.save_to_disk(str(path))
    return DatasetDict.load_from_disk(str(path))


def test_a_logged_split_is_tagged_with_a_digest_of_its_rows(tmp_path, store):
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("aigid")
    tags = []
    for name, captions in (("a", ["one", "two"]), ("b", ["one", "two"]), ("c", ["one", "three"])):
        with mlflow.start_run() as run:
            log_data(tmp_path / name, _saved(tmp_path / name, captions), {"test": "test"})
        (logged,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
        tags.append({t.key: t.value for t in logged.tags}[FINGERPRINT_TAG])
    assert tags[0] == tags[1] != tags[2]  # the same rows saved elsewhere, then one row changed


STAGE = """import sys
from aigid.core.config import load_params, view
from aigid.tracking.runs import stage_run
with stage_run(sys.argv[1], view(load_params("params.yaml"), ("mlflow",))):
    pass
open(sys.argv[1] + ".done", "w").close()
"""
PIPELINE = {
    "stages": {
        "first": {"cmd": "python stage.py first", "deps": ["stage.py"], "params": ["mlflow"], "outs": ["first.done"]},
        "second": {"cmd": "python stage.py second", "deps": ["first.done"], "outs": ["second.done"]},
    }
}


@pytest.mark.slow
def test_real_dvc_groups_a_repro_a_temporary_experiment_and_a_forced_rerun(workspace, monkeypatch):
    """Two stages that log under real DVC, the store left at its default (the repository's mlflow.db)."""
    import yaml

    (workspace / "stage.py").write_text(STAGE)
    (workspace / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE))
    (workspace / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    sh("dvc", "init", "-q", cwd=workspace)
    sh("git", "add", "-A", cwd=workspace)
    sh("git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "pipeline", cwd=workspace)
    commit = sh("git", "rev-parse", "--short=7", "HEAD", cwd=workspace).strip()
    for cmd in (("dvc", "repro"), ("dvc", "exp", "run", "--temp", "-f", "-n", "tmp-exp"), ("dvc", "repro", "-f")):
        assert "Running stage 'second'" in sh(*cmd, cwd=workspace)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aigid").experiment_id])
    parents = sorted((r for r in runs if r.data.tags.get("aigid.role") == "pipeline"), key=lambda r: r.info.start_time)
    names = [p.info.run_name.removesuffix(f"-{p.data.tags['pipeline_id'][:8]}") for p in parents]
    assert names == [f"repro-{commit}", "tmp-exp", f"repro-{commit}"]
    for parent in parents:
        stages = [r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(stages) == ["first", "second"]
