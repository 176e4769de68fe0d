"""MLflow: where runs go, and the tags that tie the runs of one pipeline execution together.

Default store: ``sqlite:///<repository root>/mlflow.db``. The root comes from ``DVC_ROOT`` (set by DVC for
every stage); experiments that DVC runs in a temporary copy (``dvc exp run --temp``, queued runs) live under
``<root>/.dvc/tmp/exps/``, so the store is placed in the real repository above that copy and every run of the
project lands in one database; logged models go to ``<root>/mlartifacts``. ``MLFLOW_TRACKING_URI`` overrides
all of this (a shared server, for example).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

import mlflow

from .errors import TrackingError

STAGE_TAG, PIPELINE_TAG = "stage", "pipeline_id"


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast on a tracking server that does not answer (the MLflow client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({err}); start it or set "
                            f"MLFLOW_TRACKING_URI to a reachable store") from None


def is_main_process() -> bool:
    """True unless this is a process other than global rank 0 of a multi-process launch (torchrun, accelerate
    launch) whose process group is already up; only rank 0 talks to MLflow and writes a stage's outputs."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _from_rank_zero(message: str | None) -> str | None:
    """Rank 0's outcome of contacting the store, sent to every rank of a multi-process launch (else returned)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def project_root() -> Path:
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def ensure_experiment(name: str, uri: str) -> None:
    """Make ``name`` the active experiment; with a sqlite store (the default), create it with its artifacts
    under ``<project root>/mlartifacts``. MLflow's default (./mlruns relative to the working directory) would
    put logged models inside the temporary copy that `dvc exp run --temp` deletes. A server keeps its own
    artifact store. An experiment that already exists keeps the location it was created with.
    """
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(project_root() / "mlartifacts").as_uri())
    mlflow.set_experiment(name)


def _git_commit(cwd: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pipeline_id(commit: str, params_file: Path) -> str:
    """Stages run by one `dvc repro` share code and params, hence this id; an experiment adds its name."""
    h = hashlib.sha1(commit.encode())
    if params_file.is_file():
        h.update(params_file.read_bytes())
    h.update(os.environ.get("DVC_EXP_NAME", "").encode())
    return h.hexdigest()[:12]


def open_store(experiment: str) -> str:
    """Point MLflow at the project's store (see :func:`tracking_uri`) and ``experiment``; return the URI."""
    uri = tracking_uri()
    _open_store(uri, experiment)
    return uri


def _open_store(uri: str, experiment: str) -> None:
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        ensure_experiment(experiment, uri)
    except Exception as err:
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {err}") from err


@contextlib.contextmanager
def stage_run(stage: str, params, params_file: str | Path = "params.yaml", extra_tags: dict | None = None):
    """An active MLflow run named after the stage, with the params it reads logged (``params`` is the
    stage's view, :class:`aigid.config.Scoped`: exactly its declared keys).

    Holding our own active run makes the Trainer's MLflow callback log into it, and keeps
    ``trainer.evaluate()`` after ``train()`` from opening a second run. The store is contacted here, before any
    work starts, so an unreachable store fails fast with its URI in the message.

    On the other ranks of a multi-process launch it yields None and leaves MLflow alone: the Trainer's MLflow
    callback logs from rank 0 only, and one stage is one run.
    """
    if not is_main_process():
        if error := _from_rank_zero(None):  # rank 0 could not use the store: stop here too, before any work
            raise TrackingError(error)
        yield None
        return
    try:
        _open_store(tracking_uri(), params.mlflow.experiment)
    except TrackingError as err:
        _from_rank_zero(str(err))
        raise
    _from_rank_zero(None)
    cwd = Path.cwd()
    commit = _git_commit(cwd)
    tags = {STAGE_TAG: stage, "git_commit": commit, PIPELINE_TAG: pipeline_id(commit, Path(params_file)),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), **(extra_tags or {})}
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params({f"params.{k}": v for k, v in params.declared().items()})
        yield run
