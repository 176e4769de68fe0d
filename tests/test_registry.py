"""Registration keyed by content: idempotent, the alias moves only to a new model, a duplicate from a race
is removed. A real sqlite MLflow store and a tiny detector."""

from __future__ import annotations

import mlflow
from click.testing import CliRunner

from aigid.cli import main
from aigid.serving.registry import ALIAS, HASH_TAG, content_hash, register
from helpers import NAME, _candidate, _png, _register, _versions


def test_the_same_model_is_registered_once_and_a_new_one_takes_the_alias(store):
    test = [{"Image": {"bytes": _png()}, "Caption": "a red circle"}]
    with mlflow.start_run(tags={"git_commit": "abc", "dvc_exp_name": ""}):
        first, created = register(store / "model", NAME, 0.5, test)
    assert created and _candidate() == first
    with mlflow.start_run():
        assert register(store / "model", NAME, 0.5, test) == (first, False)
    with mlflow.start_run():  # another operating point: another registered model
        second, created = register(store / "model", NAME, 0.7, test)
    assert created and second != first and _candidate() == second
    with mlflow.start_run():  # the older model again: nothing moves
        assert register(store / "model", NAME, 0.5, test) == (first, False)
    assert _candidate() == second and len(_versions()) == 2
    tags = _versions()[0].tags
    assert tags[HASH_TAG] == content_hash(store / "model", 0.5) and tags["git_commit"] == "abc"


def test_a_version_registered_meanwhile_by_another_clone_wins(store, monkeypatch):
    """Two clones registering one model at once: the older version stays, the later one is deleted."""
    import aigid.serving.registry as registry

    test = [{"Image": {"bytes": _png()}, "Caption": ""}]
    with mlflow.start_run():
        first, _ = register(store / "model", NAME, 0.5, test)
    seen = iter([None])  # the second clone's first look finds nothing
    real = registry.find_version
    monkeypatch.setattr(registry, "find_version", lambda *a: _race(seen, real, a))
    with mlflow.start_run():
        assert register(store / "model", NAME, 0.5, test) == (first, False)
    assert [str(v.version) for v in _versions()] == [first] and _candidate() == first


def _race(seen, real, args):
    try:
        return next(seen)
    except StopIteration:
        return real(*args)


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


def _promote(*extra) -> str:
    result = CliRunner().invoke(main, ["promote", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def _champion() -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def test_promote_moves_champion_only_to_a_better_candidate_on_the_same_test_data(store):
    assert CliRunner().invoke(main, ["promote"]).output.startswith("Error: aigid-detector has no @candidate")
    _register(store, 0.4, balanced_accuracy=0.80)
    assert "version 1 promoted to @champion: first @champion" in _promote() and _champion() == "1"
    assert "already" in _promote()
    _register(store, 0.5, balanced_accuracy=0.78)  # worse: the champion stays
    assert "version 2 not promoted" in _promote() and _champion() == "1"
    v2 = mlflow.MlflowClient().get_model_version(NAME, "2")
    assert v2.tags["promotion"] == "rejected" and "0.7800 does not beat @champion version 1 (0.8000)" in v2.description
    _register(store, 0.6, balanced_accuracy=0.82)  # better on the same test rows: promoted
    assert "version 3 promoted" in _promote() and _champion() == "3"
    assert mlflow.MlflowClient().get_model_version(NAME, "3").tags["promotion"] == "champion"
    _register(store, 0.7, balanced_accuracy=0.99, caption="other rows")  # better, but on other test data
    assert "not compared: scored on other test data" in _promote() and _champion() == "3"
