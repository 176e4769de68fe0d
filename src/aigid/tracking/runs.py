"""MLflow: where runs go, one parent run per pipeline execution, what each stage logs.

Every `dvc repro` or `dvc exp run` is one parent run, named after the DVC experiment (or
``repro-<short commit>``) and the execution (``repro-3dfab77-1a2b3c4d``: two clones of one commit, or one
experiment name run twice, are two parents with two names), with each stage's run under it. Stages run as
separate processes; each finds its parent by the rule of :func:`parent_run`, built only on what DVC documents
(docs/decisions.md): the pipeline's key (:func:`pipeline_key`: DVC_ROOT, DVC_EXP_NAME, the git commit and
params.yaml) names the latest parent of that key, which a stage joins unless it already holds a run of that
stage (then the stage starts a new execution). The parent's ``pipeline_id`` (whose first 8 characters end its
name) tags it and its stage runs. A stage run outside DVC stands alone. A stage run logs the params it reads
under their params.yaml keys, its DVC metrics under their DVC keys (:func:`log_results`), and the data it read
as MLflow datasets whose digest is DVC's hash of the directory (:func:`log_data`).

Default store: ``sqlite:///<repository root>/mlflow.db``. The root comes from ``DVC_ROOT`` (set by DVC for
every stage); experiments that DVC runs in a temporary copy (``dvc exp run --temp``, queued runs) live under
``<root>/.dvc/tmp/exps/``, so the store is placed in the real repository above that copy and every run of the
project lands in one database; logged models go to ``<root>/mlartifacts``. ``MLFLOW_TRACKING_URI`` overrides
all of this (a shared server, for example).

A server is asked whether it answers when a stage starts (:func:`check_reachable`). Its HTTP calls are retried
a bounded time (:data:`HTTP_DEFAULTS`, set unless the environment sets them; MLflow's own defaults retry a
dead server for about four minutes per call); one that stops answering during a stage ends the stage with one
line naming it (:class:`~aigid.core.errors.TrackingError`), without further calls to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import mlflow

from aigid.core.errors import TrackingError

STAGE_TAG, PIPELINE_TAG, ROLE_TAG, KEY_TAG = "stage", "pipeline_id", "aigid.role", "aigid.pipeline_key"
FINGERPRINT_TAG = "fingerprint"  # a logged split's content digest (:func:`split_fingerprints`)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's system tag naming a run's parent
# The MLflow UI opens an experiment of this kind in its model-training view (runs, metrics, models).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# MLflow's HTTP retries against a tracking server. Every call is tried 5 times, waiting 0, 2, 4 and 8 s (plus up
# to 1 s of jitter) in between: a server restarting within about 15 s is ridden out, a dead one reported about
# 15 s after the call that found it. An attempt waits up to 60 s for an answer (a large model's upload is
# answered once the server has stored it). The environment's own values win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def bound_http_retries() -> None:
    """Set :data:`HTTP_DEFAULTS` where the environment does not (MLflow reads them at every request)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast on a tracking server that does not answer (the MLflow client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({err}); start it or set "
            f"MLFLOW_TRACKING_URI to a reachable store"
        ) from None


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
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def ensure_experiment(name: str, uri: str) -> str:
    """Make ``name`` the active experiment; with a sqlite store (the default), create it with its artifacts
    under ``<project root>/mlartifacts``. MLflow's default (./mlruns relative to the working directory) would
    put logged models inside the temporary copy that `dvc exp run --temp` deletes. A server keeps its own
    artifact store. An experiment that already exists keeps the location it was created with.
    Returns the experiment's id.
    """
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = (project_root() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    elif EXPERIMENT_KIND[0] not in experiment.tags:  # one created before the kind was set; a user's choice stays
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return mlflow.set_experiment(name).experiment_id


def _git_commit(cwd: Path) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pipeline_key(commit: str) -> str | None:
    """What the stages of one pipeline share, from what DVC documents; None outside DVC.

    DVC sets ``DVC_ROOT`` (the repository root: for `dvc exp run --temp` and queued experiments, the temporary
    copy the experiment runs in) for every stage it runs, and ``DVC_EXP_NAME`` for those of `dvc exp run`.
    With the git commit and the digest of the params file (params.yaml, DVC's default) they tell one pipeline
    from another: another clone, experiment, commit or value gives another key. Which execution of that
    pipeline a stage belongs to is :func:`parent_run`'s rule.
    """
    root = os.environ.get("DVC_ROOT")
    if not root:
        return None
    try:
        params = hashlib.sha256((Path(root) / "params.yaml").read_bytes()).hexdigest()
    except OSError:
        params = ""
    facts = [str(Path(root).resolve()), os.environ.get("DVC_EXP_NAME", ""), commit, params]
    return hashlib.sha256("\0".join(facts).encode()).hexdigest()[:16]


def parent_run(experiment_id: str, key: str, stage: str, name: str, tags: dict) -> tuple[str, str]:
    """The parent run that ``stage`` of pipeline ``key`` belongs to, and its ``pipeline_id``.

    It is the latest parent of ``key`` unless that one already holds a run of ``stage`` (a forced rerun, the
    same commit reproduced again): then the stage starts a new execution, a new parent named
    ``<name>-<first 8 characters of its pipeline_id>``, which the stages after it join.
    """
    client = mlflow.MlflowClient()
    latest = client.search_runs(
        [experiment_id],
        f"tags.`{KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if latest:
        parent = latest[0]
        query = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and tags.{STAGE_TAG} = '{stage}'"
        if not client.search_runs([experiment_id], query, max_results=1):
            return parent.info.run_id, parent.data.tags[PIPELINE_TAG]
    pipeline = uuid.uuid4().hex[:12]
    tags = {**tags, KEY_TAG: key, PIPELINE_TAG: pipeline, ROLE_TAG: "pipeline"}
    return client.create_run(experiment_id, run_name=f"{name}-{pipeline[:8]}", tags=tags).info.run_id, pipeline


def open_store(experiment: str) -> str:
    """Point MLflow at the project's store (see :func:`tracking_uri`) and ``experiment``; return the URI."""
    uri = tracking_uri()
    _open_store(uri, experiment)
    return uri


def _open_store(uri: str, experiment: str) -> str:
    bound_http_retries()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        return ensure_experiment(experiment, uri)
    except Exception as err:
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {err}") from err


@contextlib.contextmanager
def stage_run(stage: str, params):
    """An active MLflow run named after the stage, under its pipeline execution's parent run (:func:`parent_run`,
    whose id it is given), with the params it reads logged under their params.yaml keys (``params`` is the
    stage's view, :class:`aigid.core.config.View`: exactly its declared keys; the parent gets them too).

    The stage's run is this process's active run, so that MLflow's own logging calls in the stage
    (``mlflow.log_dict``; ``mlflow.pyfunc.log_model``, which takes no run id) land in it; the parent is only
    ever addressed by its id. The store is contacted here, before any work starts, so an unreachable store
    fails fast with its URI in the message.

    On the other ranks of a multi-process launch it yields None and leaves MLflow alone: one stage is one run,
    logged by rank 0.
    """
    if not is_main_process():
        if error := _from_rank_zero(None):  # rank 0 could not use the store: stop here too, before any work
            raise TrackingError(error)
        yield None
        return
    uri = tracking_uri()
    try:
        experiment_id = _open_store(uri, params.mlflow.experiment)
    except TrackingError as err:
        _from_rank_zero(str(err))
        raise
    _from_rank_zero(None)
    commit = _git_commit(Path.cwd())
    experiment_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {"git_commit": commit, "dvc_exp_name": experiment_name}
    declared = params.declared()
    client = mlflow.MlflowClient()
    # A server that stops answering is one line (TrackingError) whether it goes while the runs are opened or
    # closed (outer block) or during the stage's work (inner: the runs are then left as they are).
    with _server_failures(uri, stage):
        parent, key = None, pipeline_key(commit)
        if key is not None:
            parent, tags[PIPELINE_TAG] = parent_run(
                experiment_id, key, stage, experiment_name or f"repro-{commit[:7]}", tags
            )
            _log_params_once(parent, declared)
            client.update_run(parent, status="RUNNING")
        stage_tags = {**tags, STAGE_TAG: stage, ROLE_TAG: "stage"}
        try:
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=stage, parent_run_id=parent, tags=stage_tags
            ) as run:
                with _server_failures(uri, stage):
                    mlflow.log_params(declared)
                    yield run
        except TrackingError:
            raise  # the store is gone: nothing more is sent to it
        except BaseException:
            if parent is not None:
                client.set_terminated(parent, "FAILED")
            raise
        if parent is not None:
            client.set_terminated(parent, "FINISHED")


def _connection_failure(err: BaseException) -> str | None:
    """What went wrong, in a few words, when ``err`` (or an error it was raised from or while handling) is an
    HTTP request to the store that failed after its retries (no answer, refused, error responses); else None."""
    import requests

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, requests.exceptions.RequestException):
            if isinstance(err, requests.exceptions.Timeout) or "timed out" in str(err):
                return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '120')} s"
            found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)|ResponseError\('([^']+)'", str(err))
            return next(g for g in found.groups() if g) if found else type(err).__name__
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _server_failures(uri: str, stage: str):
    """An MLflow call of the block that found the store gone becomes one line naming it (TrackingError); the
    active run is ended in one attempt without retries (:func:`_end_without_retries`)."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as err:
        reason = _connection_failure(err)
        if reason is None:
            raise
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "")
        _end_without_retries()
        raise TrackingError(
            f"MLflow tracking server {uri} stopped answering during stage {stage} ({reason}, "
            f"after {retries} retries); the stage did not finish: rerun it once the server "
            f"answers"
        ) from None


def _end_without_retries() -> None:
    """End the active run as FAILED with a single request and no retries: the store was just found gone, so the
    run stays as the store last heard of it (RUNNING), and MLflow, which forgets an active run before it reports
    its end, does not try again when the process exits."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    with contextlib.suppress(Exception):
        mlflow.end_run("FAILED")


def _log_params_once(run_id: str, params: dict) -> None:
    """Add the params the parent run lacks (the stages of one execution read one params.yaml)."""
    have = mlflow.get_run(run_id).data.params
    missing = {k: v for k, v in params.items() if k not in have}
    if missing:
        mlflow.MlflowClient().log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in missing.items()])


def log_results(metrics: dict, parent: bool = False) -> None:
    """A stage's DVC metrics as metrics of its run, under the keys `dvc metrics show` prints
    (``retrained.task_a.f1_weighted``); booleans as 0/1. ``parent``: the pipeline's parent run gets them too."""
    from aigid.core.config import flatten

    values = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
    mlflow.log_metrics(values)
    parent_id = mlflow.active_run().data.tags.get("mlflow.parentRunId")
    if parent and parent_id:
        mlflow.MlflowClient().log_batch(
            parent_id, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in values.items()]
        )


def dvc_tree(path: Path):
    """DVC's tree of a directory: each file's md5 by its path inside it, and the directory's hash
    (``hash_info.value``, ``<md5>.dir``, as dvc.lock records it)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    staging = HashFileDB(MemoryFileSystem(), "/staging")  # the tree object stays in memory
    _, _, obj = build(staging, str(Path(path).resolve()), LocalFileSystem(), "md5", dry_run=True)
    return obj


def split_fingerprints(tree) -> dict[str, str]:
    """Each split's content digest, from the DVC tree (:func:`dvc_tree`) of a saved DatasetDict: a sha256 of its
    row files (``<split>/*.arrow``) by name and md5. The same rows saved anywhere give the same digest."""
    found: dict = {}
    for key, _, info in sorted(tree, key=lambda entry: entry[0]):
        if len(key) == 2 and key[1].endswith(".arrow"):
            found.setdefault(key[0], hashlib.sha256()).update(f"{key[1]}\0{info.value}\n".encode())
    return {split: digest.hexdigest()[:16] for split, digest in found.items()}


def log_data(path: Path, data, splits: dict[str, str]) -> str:
    """Log splits of ``data`` (the DatasetDict at ``path``) as inputs of the active run: ``splits`` maps a split to its
    context (training, validation, test, pool). Each is an MLflow dataset named ``<path>:<split>`` with its
    rows, its source (the path) and, as digest, DVC's hash of ``path`` (:func:`dvc_tree`); the input is tagged
    with the split's own content digest (``fingerprint``: :func:`split_fingerprints`), which tells whether two
    runs saw the same rows of one split. Returns the digest."""
    from mlflow.data.huggingface_dataset import from_huggingface

    tree, name = dvc_tree(path), Path(path).as_posix()
    digest, fingerprints = tree.hash_info.value, split_fingerprints(tree)
    for split, context in splits.items():
        ds = data[split]
        ds = ds.select_columns([c for c in ds.column_names if c != "Image"])  # the schema without the pixels
        with warnings.catch_warnings():  # a hint for model signatures; a dataset's schema is only described
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
            dataset = from_huggingface(ds, path=name, name=f"{name}:{split}", digest=digest)
            mlflow.log_input(dataset, context=context, tags={FINGERPRINT_TAG: fingerprints[split]})
    return digest
