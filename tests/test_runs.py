"""aigid.tracking.runs in isolation: the id of a pipeline execution (the end-to-end grouping of stage runs under
their parent is in test_pipeline.py and test_tracking_server.py)."""

import json

from aigid.tracking.runs import pipeline_id


def _stage_of(tmp_path, monkeypatch, pid: int, experiment: str = ""):
    """The working directory and environment of a stage that the DVC process ``pid`` runs."""
    locks = tmp_path / ".dvc/tmp"
    locks.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "cmd": "dvc repro"}
    (locks / "rwlock").write_text(json.dumps({"write": {str(tmp_path / "models/base"): holder}, "read": {}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", experiment)


def test_stages_of_one_execution_share_an_id_and_other_executions_get_others(tmp_path, monkeypatch):
    _stage_of(tmp_path, monkeypatch, 4242)
    first = pipeline_id()
    assert first is not None and len(first) == 12
    _stage_of(tmp_path, monkeypatch, 4242)  # the next stage of the same `dvc repro`
    assert pipeline_id() == first
    _stage_of(tmp_path, monkeypatch, 4343)  # the same commit reproduced again
    assert pipeline_id() not in (None, first)
    _stage_of(tmp_path, monkeypatch, 4242, experiment="bushy-lamb")
    assert pipeline_id() not in (None, first)
    clone = tmp_path / "clone"
    clone.mkdir()
    _stage_of(clone, monkeypatch, 4242)  # another workspace
    assert pipeline_id() not in (None, first)


def test_no_id_outside_dvc_or_without_its_lock(tmp_path, monkeypatch):
    _stage_of(tmp_path, monkeypatch, 4242)
    monkeypatch.delenv("DVC_ROOT")
    assert pipeline_id() is None  # a stage run by hand stands alone
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    (tmp_path / ".dvc/tmp/rwlock").write_text("{}")
    assert pipeline_id() is None
    (tmp_path / ".dvc/tmp/rwlock").write_text("not json")
    assert pipeline_id() is None
