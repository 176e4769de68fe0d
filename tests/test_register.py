"""`aigid register` (aigid.serving.register): registering the current model is idempotent. A real sqlite MLflow
store and a tiny detector."""

from __future__ import annotations

import mlflow

from aigid.serving.registry import ALIAS
from helpers import NAME, _candidate, _register, _versions


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
