"""A shared MLflow tracking server, used as a team uses it: `mlflow server` with a sqlite database and its
artifacts proxied to an S3-compatible store (the server holds the S3 credentials, the clients none), and the
pipeline run from two clones of one commit against it. Then the server going away in the middle of a stage."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from aigid.serving.registry import content_hash
from helpers import (
    NAME,
    REPO,
    S3_KEYS,
    environment,
    free_port,
    local_server,
    make_bucket,
    mlflow_server,
    tiny_params_dict,
)

pytestmark = pytest.mark.slow
TRACKED = ("train", "pseudolabel", "retrain", "evaluate")  # the stages that log to MLflow
REPRO = ("dvc", "repro", "evaluate")  # after the first clone's: up to the registered model (export logs nothing)


def client_env(uri: str) -> dict[str, str]:
    """A team member's environment: the server's address, no cloud credentials."""
    env = {k: v for k, v in environment().items() if not k.startswith("AWS_")}
    return {**env, "MLFLOW_TRACKING_URI": uri}


def run(*cmd: str, cwd: Path, uri: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env={**client_env(uri), **env}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def server(s3_server, tmp_path_factory):
    """`mlflow server` on 127.0.0.1: runs and the registry in sqlite, artifacts in s3://team-mlflow/artifacts."""
    root = tmp_path_factory.mktemp("server")
    bucket = make_bucket(s3_server, "team-mlflow")
    with s3_mlflow_server(root / "mlflow.db", f"{bucket}/artifacts", s3_server) as (uri, proc):
        yield SimpleNamespace(uri=uri, proc=proc, s3=s3_server, bucket=bucket, root=root)


def s3_mlflow_server(db: Path, artifacts: str, s3_endpoint: str, port: int | None = None):
    """`mlflow server` proxying artifacts to ``artifacts`` on the S3 server: it alone gets the S3 credentials."""
    return mlflow_server(db, artifacts, environment(MLFLOW_S3_ENDPOINT_URL=s3_endpoint, **S3_KEYS), port)


@pytest.fixture(scope="module")
def first(server, tmp_path_factory) -> Path:
    """A git + DVC repository of this project's pipeline on a tiny params.yaml, reproduced against the server."""
    root = tmp_path_factory.mktemp("first")
    for name in ("dvc.yaml", ".gitignore", "data/raw/README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    for cmd in (
        ("git", "init", "-q"),
        ("git", "config", "user.email", "ci@example.com"),
        ("git", "config", "user.name", "ci"),
        ("dvc", "init", "-q"),
        ("git", "add", "-A"),
        ("git", "commit", "-qm", "tiny pipeline"),
        ("dvc", "repro"),
    ):
        run(*cmd, cwd=root, uri=server.uri)
    return root


@pytest.fixture(scope="module")
def second(first, server, tmp_path_factory) -> Path:
    """A clone of the first repository (the same commit, no DVC cache): `dvc repro` computes everything again."""
    root = tmp_path_factory.mktemp("second") / "clone"
    run("git", "clone", "-q", str(first), str(root), cwd=first, uri=server.uri)
    run(*REPRO, cwd=root, uri=server.uri)
    return root


def client(server) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=server.uri)


def parents_and_stages(server) -> dict:
    """Each parent run (by name) with its stage runs (by stage)."""
    runs = client(server).search_runs([client(server).get_experiment_by_name("aigid").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("aigid.role") == "pipeline"]
    return {
        p.info.run_name: (
            p,
            {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id},
        )
        for p in parents
    }


def versions(server) -> list:
    return sorted(client(server).search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))


def alias(server, name: str) -> str | None:
    return next((str(v) for a, v in client(server).get_registered_model(NAME).aliases.items() if a == name), None)


def s3_keys(server) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=server.s3,
        aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_KEYS["AWS_DEFAULT_REGION"],
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=server.bucket.removeprefix("s3://"))
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_each_execution_is_a_parent_run_of_its_own_with_a_name_of_its_own(first, second, server):
    commit = run("git", "rev-parse", "--short=7", "HEAD", cwd=second, uri=server.uri).stdout.strip()
    assert run("git", "rev-parse", "--short=7", "HEAD", cwd=first, uri=server.uri).stdout.strip() == commit
    executions = parents_and_stages(server)
    assert len(executions) == 2, sorted(executions)  # one parent per clone's `dvc repro`
    for name, (parent, stages) in executions.items():
        assert name == f"repro-{commit}-{parent.data.tags['pipeline_id'][:8]}"
        assert sorted(stages) == sorted(TRACKED)
        assert {r.data.tags["pipeline_id"] for r in stages.values()} == {parent.data.tags["pipeline_id"]}
        assert (
            parent.data.metrics["retrained.task_a.f1_weighted"]
            == stages["evaluate"].data.metrics["retrained.task_a.f1_weighted"]
        )


def test_one_version_per_model_content_across_clones_its_artifacts_in_s3(first, second, server):
    threshold = json.loads((first / "reports/evaluate.json").read_text())["retrained"]["operating_point"]["threshold"]
    same = content_hash(first / "models/retrained", threshold)
    assert content_hash(second / "models/retrained", threshold) == same  # the clones trained the same model
    (version,) = versions(server)  # so the second evaluate added nothing
    assert version.tags["model_hash"] == same and alias(server, "candidate") == version.version
    assert alias(server, "champion") is None  # no command has promoted anything
    assert "is registered already" in run("aigid", "register", cwd=second, uri=server.uri).stderr
    assert len(versions(server)) == 1
    # The model went through the server into the bucket: the clients hold no S3 credentials, nothing is local.
    stored = client(server).get_logged_model(version.source.removeprefix("models:/")).artifact_location
    assert stored.startswith("mlflow-artifacts:/")  # served by the tracking server
    weights = [k for k in s3_keys(server) if k.endswith("/model.safetensors")]
    assert len(weights) == 1 and weights[0].startswith(f"artifacts/{stored.removeprefix('mlflow-artifacts:/')}/")
    for clone in (first, second):
        assert not (clone / "mlartifacts").exists() and not (clone / "mlruns").exists() and not any(clone.glob("*.db"))


def test_aliases_move_only_by_register_and_promote(first, second, server):
    out = run("aigid", "promote", cwd=first, uri=server.uri).stdout
    (v1,) = versions(server)
    assert alias(server, "champion") == v1.version, out
    params = yaml.safe_load((second / "params.yaml").read_text())
    params["threshold"] = 0.4  # another pseudo-labelled set: another retrained model
    (second / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(*REPRO, cwd=second, uri=server.uri)
    v1, v2 = versions(server)
    assert alias(server, "candidate") == v2.version and alias(server, "champion") == v1.version
    assert len(parents_and_stages(server)) == 3
    assert len([k for k in s3_keys(server) if k.endswith("/model.safetensors")]) == 2
    out = run("aigid", "register", cwd=first, uri=server.uri).stderr  # the first clone's older model: nothing moves
    assert "is registered already" in out and len(versions(server)) == 2
    assert alias(server, "candidate") == v2.version and alias(server, "champion") == v1.version
    out = run("aigid", "promote", cwd=second, uri=server.uri).stdout
    metric = "retrained.task_a.balanced_accuracy"
    score = {v.version: client(server).get_run(v.run_id).data.metrics[metric] for v in (v1, v2)}
    better = score[v2.version] > score[v1.version]
    assert alias(server, "champion") == (v2.version if better else v1.version), out
    assert alias(server, "candidate") == v2.version
    assert "on the same test data" in client(server).get_model_version(NAME, v2.version).tags["promotion_reason"]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_detect_and_serve_the_champion_from_the_second_clone(first, second, server, tmp_path):
    from aigid.core.data import open_dataset

    champion = alias(server, "champion")
    assert champion is not None
    home = second if champion == versions(server)[-1].version else first  # the clone holding its model directory
    png = tmp_path / "x.png"
    png.write_bytes(open_dataset(second / "data/prepared")["test"][0]["Image"]["bytes"])
    detect = (
        "aigid",
        "detect",
        str(png),
        "-q",
        "--format",
        "json",
        "--threshold-from",
        str(home / "metrics/evaluate.json"),
    )  # the threshold the registered model labels at
    (local,) = json.loads(run(*detect, "--model", str(home / "models/retrained"), cwd=second, uri=server.uri).stdout)
    # MLflow's default: the files straight from the bucket, at addresses the server signs; then all through the
    # server, as where the clients cannot reach the bucket.
    # Each route into a cache of its own: a version is downloaded once per cache, then read from it.
    for i, route in enumerate(({}, {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"})):
        cache = tmp_path / f"cache{i}"
        for _ in range(2):
            (row,) = json.loads(
                run(
                    *detect,
                    "--model",
                    f"models:/{NAME}@champion",
                    cwd=second,
                    uri=server.uri,
                    AIGID_CACHE=str(cache),
                    **route,
                ).stdout
            )
            assert row["error"] == "" and row["prob_ai"] == pytest.approx(local["prob_ai"], abs=1e-6)
        (kept,) = (cache / "models").iterdir()
        assert kept.name.startswith(f"{NAME}-v{champion}-")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{NAME}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with local_server(cmd, f"{url}/ping", cwd=second, env=client_env(server.uri)):
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png.read_bytes()).decode()]]}}
        (served,) = _post(f"{url}/invocations", body)["predictions"]
    assert served["error"] == "" and served["prob_ai"] == pytest.approx(row["prob_ai"], abs=1e-6)
    assert served["label"] == row["label"] and served["threshold"] == row["threshold"]


def _train_logged_an_epoch(uri: str) -> bool:
    try:
        experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("aigid")
        runs = (
            []
            if experiment is None
            else mlflow.MlflowClient(tracking_uri=uri).search_runs([experiment.experiment_id], "tags.stage = 'train'")
        )
    except mlflow.exceptions.MlflowException:
        return False
    return any("history/f1_weighted_a" in r.data.metrics for r in runs)


def test_the_server_going_away_mid_stage_stops_it_with_one_line_and_dvc_records_nothing(second, server):
    """The server is killed while `train` runs: the stage's next MLflow call fails after its bounded retries,
    the stage ends with one line naming the server, writes none of its outputs, and DVC records nothing; with
    the server still away the rerun stops before training; with it back, the rerun resumes and completes."""
    params = yaml.safe_load((second / "params.yaml").read_text())
    params["train"]["epochs"] = 6  # train reruns, and runs long enough to be interrupted
    (second / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lock = lambda: yaml.safe_load((second / "dvc.lock").read_text())["stages"]  # noqa: E731
    recorded = lock()
    outputs = ("models/base", "metrics/train.json", "reports/train.json", "metrics/train_history.json")
    db, port = server.root / "killed.db", free_port()
    with s3_mlflow_server(db, f"{server.bucket}/killed", server.s3, port) as (uri, proc):
        pipeline = subprocess.Popen(
            REPRO, cwd=second, env=client_env(uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 300
        while not _train_logged_an_epoch(uri):
            assert pipeline.poll() is None and time.monotonic() < deadline, pipeline.communicate()[0]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        out, _ = pipeline.communicate(timeout=300)
    took = time.monotonic() - killed
    print(f"the stage failed {took:.1f} s after the server was killed")
    assert pipeline.returncode != 0, out
    (line,) = [line for line in out.splitlines() if uri in line]
    assert line.startswith(f"Error: MLflow tracking server {uri} stopped answering during stage train"), out
    assert "Traceback" not in out and "Running stage 'pseudolabel'" not in out and took < 90, out
    assert [name for name in outputs if (second / name).exists()] == []
    assert lock() == recorded  # DVC recorded nothing of the failed stage
    assert "train" in {
        name.split(":")[-1] for name in json.loads(run("dvc", "status", "--json", cwd=second, uri=uri).stdout)
    }

    started = time.monotonic()  # still away: the rerun stops before any training
    again = subprocess.run(REPRO, cwd=second, env=client_env(uri), capture_output=True, text=True, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode != 0 and "Traceback" not in out and time.monotonic() - started < 90, out
    (line,) = [line for line in out.splitlines() if uri in line]
    assert line.startswith(f"Error: MLflow tracking server {uri} is not reachable"), out
    assert lock() == recorded and [name for name in outputs if (second / name).exists()] == []

    with s3_mlflow_server(db, f"{server.bucket}/killed", server.s3, port):  # back, with what it had stored
        done = run("dvc", "repro", "train", cwd=second, uri=uri)
        assert "resuming train from the last checkpoint" in done.stdout + done.stderr
        assert lock()["train"]["params"]["params.yaml"]["train"]["epochs"] == 6
        assert all((second / name).exists() for name in outputs)
        # The interrupted run stays RUNNING (the server never heard its end); the rerun is an execution of its own.
        back = mlflow.MlflowClient(tracking_uri=uri)
        runs = back.search_runs([back.get_experiment_by_name("aigid").experiment_id], "tags.stage = 'train'")
        assert sorted(r.info.status for r in runs) == ["FINISHED", "RUNNING"]
        assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 2
