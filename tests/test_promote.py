"""`aigid promote` (aigid.tools.promote): @champion moves only to a better candidate scored on the same test
data. A real sqlite MLflow store and a tiny detector."""

from __future__ import annotations

import mlflow
from click.testing import CliRunner

from aigid.cli import main
from helpers import NAME, _register


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
