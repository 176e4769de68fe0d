"""`aigid promote`: move the alias @champion to the @candidate model when it is better on the same test data.

Every registered version comes from a run that logged its test metrics under their DVC keys
(``retrained.task_a.balanced_accuracy``) and its test split as an MLflow dataset (context ``test``, tagged with
the split's content fingerprint). The candidate becomes the champion when there is no champion yet, or when
both were scored on the same test rows and the candidate's metric is strictly higher. Scores on different
test data are not compared: the champion stays. Either way the decision and its reason are recorded on the
candidate version (tags ``promotion`` and ``promotion_reason``, and its description).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import mlflow

from aigid.core import stage
from aigid.core.errors import TrackingError
from aigid.serving.registry import ALIAS
from aigid.tracking.metrics import HEADLINE
from aigid.tracking.runs import FINGERPRINT_TAG, open_store

PARAMS = ("mlflow",)
CHAMPION = "champion"
# Quality metrics of the retrained model, higher is better (the threshold is not one).
METRICS = tuple(f"retrained.{key}" for key in HEADLINE if key != "operating_point.threshold")
DEFAULT_METRIC = "retrained.task_a.balanced_accuracy"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    version: str
    reason: str


def evidence(client, name: str, version, metric: str) -> tuple[float, str]:
    """The version's ``metric`` and the fingerprint of the test split it was scored on, from its run."""
    label = f"{name} version {version.version}"
    try:
        run = client.get_run(version.run_id)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"{label}: its run {version.run_id} is not in this store") from None
    if metric not in run.data.metrics:
        raise TrackingError(
            f"{label}: its run logged no {metric} (registered before test metrics were logged under "
            f"their DVC keys), so it cannot be compared"
        )
    tests = {
        t.value
        for d in run.inputs.dataset_inputs
        for t in d.tags
        if t.key == FINGERPRINT_TAG
        if any(c.key == "mlflow.data.context" and c.value == "test" for c in d.tags)
    }
    if len(tests) != 1:
        raise TrackingError(f"{label}: its run logged {len(tests)} test datasets, not one, so it cannot be compared")
    return run.data.metrics[metric], tests.pop()


def promote(name: str, metric: str = DEFAULT_METRIC) -> Decision:
    """Compare @candidate with @champion on ``metric`` and move @champion if the candidate wins."""
    client = mlflow.MlflowClient()
    candidate = _by_alias(client, name, ALIAS)
    if candidate is None:
        raise TrackingError(f"{name} has no @{ALIAS}: run `dvc repro` (evaluate registers one) or `aigid register`")
    champion = _by_alias(client, name, CHAMPION)
    if champion is not None and champion.version == candidate.version:
        return Decision(False, candidate.version, f"version {candidate.version} is @{CHAMPION} already")
    value, test = evidence(client, name, candidate, metric)
    if champion is None:
        promoted, reason = True, f"first @{CHAMPION}: {metric} = {value:.4f}"
    else:
        held, held_test = evidence(client, name, champion, metric)
        if held_test != test:
            promoted, reason = (
                False,
                (
                    f"not compared: scored on other test data than @{CHAMPION} version "
                    f"{champion.version} (test fingerprint {test} vs {held_test})"
                ),
            )
        else:
            promoted = value > held
            reason = (
                f"{metric} = {value:.4f} {'beats' if promoted else 'does not beat'} @{CHAMPION} version "
                f"{champion.version} ({held:.4f}) on the same test data"
            )
    client.set_model_version_tag(name, candidate.version, "promotion", CHAMPION if promoted else "rejected")
    client.set_model_version_tag(name, candidate.version, "promotion_reason", reason)
    client.update_model_version(name, candidate.version, description=f"promote: {reason}")
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return Decision(promoted, candidate.version, reason)


def _by_alias(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:  # no such alias (or no such model)
        return None


@click.command("promote")
@click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="Parameters file (mlflow.registered_model, mlflow.experiment).",
)
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    default=DEFAULT_METRIC,
    show_default=True,
    help="Test metric the candidate must beat the champion on (higher is better).",
)
@stage.clean_errors
def command(params_file: Path, metric: str) -> None:
    """Point @champion at the @candidate version if it beats the champion on METRIC over the same test data
    (or if there is no champion yet). The decision and its reason are recorded on the candidate version."""
    params = stage.load(params_file, PARAMS)
    open_store(params.mlflow.experiment)
    decision = promote(params.mlflow.registered_model, metric)
    verb = "promoted to" if decision.promoted else "not promoted to"
    click.echo(f"{params.mlflow.registered_model} version {decision.version} {verb} @{CHAMPION}: {decision.reason}")
