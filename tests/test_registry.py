"""Registration keyed by content (aigid.serving.registry): idempotent, the alias moves only to a new model, a
duplicate from a race is removed, an operating point one float32 step away is the same model. A real sqlite MLflow
store and a tiny detector."""

from __future__ import annotations

import mlflow
import pytest

from aigid.serving.registry import HASH_TAG, content_hash, register
from helpers import NAME, _candidate, _png, _versions


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


@pytest.mark.slow
def test_the_same_weights_one_float32_step_from_the_threshold_are_the_registered_version(store):
    """Scored on another machine, the same weights can get an operating point one float32 step away: that is
    the version registered already, not a new one; a threshold further away is another registered model."""
    import numpy as np

    from aigid.serving.registry import THRESHOLD_RTOL, register

    test = [{"Image": {"bytes": _png()}, "Caption": ""}]
    nearby = float(np.nextafter(np.float32(0.7471870), np.float32(1)))
    with mlflow.start_run():
        first, created = register(store / "model", NAME, 0.7471870, test)
    with mlflow.start_run():
        assert register(store / "model", NAME, nearby, test) == (first, False)
    with mlflow.start_run():
        second, created = register(store / "model", NAME, 0.7471870 * (1 + 2 * THRESHOLD_RTOL), test)
    assert created and second != first
    tags = mlflow.MlflowClient().get_model_version(NAME, first).tags
    assert float(tags["threshold"]) == 0.7471870 and len(tags["weights_hash"]) == len(tags["model_hash"]) == 64
