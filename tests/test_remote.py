"""A DVC remote on a real S3-compatible server (moto's, on 127.0.0.1), used as a team uses it (docs/team.md):
one clone reproduces the tiny pipeline and pushes its outputs and run cache, fresh clones pull instead of
recomputing, an experiment travels between clones, CI's remote step (.ci/remote) restores every stage and its
report (.ci/report) applies a tolerance; a remote that is down or refuses the credentials is one line and
loses nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from aigid.core.data import open_dataset
from helpers import REPO, S3_KEYS, STAGES, _env, free_port, make_bucket

pytestmark = pytest.mark.slow
EXPERIMENT = {"name": "higher-threshold", "threshold": 0.3, "features.batch_size": 64}


def env(**extra: str) -> dict[str, str]:
    """The environment of every command: none of the caller's MLFLOW_/DVC_/AWS_ variables, the test server's
    keys as the only credentials anywhere (no ~/.aws, no instance metadata), no DVC analytics."""
    base = {k: v for k, v in _env().items() if not k.startswith("AWS_")}
    none = "/nonexistent/aws"  # botocore and dvc-s3 skip a missing file (but refuse /dev/null)
    return {
        **base,
        **S3_KEYS,
        "AWS_CONFIG_FILE": none,
        "AWS_SHARED_CREDENTIALS_FILE": none,
        "AWS_EC2_METADATA_DISABLED": "true",
        "DVC_NO_ANALYTICS": "1",
        **extra,
    }


def run(*cmd: str, cwd: Path, ok: bool = True, **extra: str) -> str:
    """Run ``cmd`` (within 10 minutes); its stdout and stderr. Asserts it succeeds, or with ``ok=False`` fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"{' '.join(cmd)} exited {proc.returncode}:\n{out}"
    return out


def use_remote(
    root: Path, endpoint: str, keys: tuple[str, str] = (S3_KEYS["AWS_ACCESS_KEY_ID"], S3_KEYS["AWS_SECRET_ACCESS_KEY"])
) -> None:
    """docs/team.md's per-clone setup: the S3-compatible server and the credentials, in .dvc/config.local."""
    run("dvc", "remote", "modify", "--local", "storage", "endpointurl", endpoint, cwd=root)
    run("dvc", "remote", "modify", "--local", "storage", "access_key_id", keys[0], cwd=root)
    run("dvc", "remote", "modify", "--local", "storage", "secret_access_key", keys[1], cwd=root)


def cached_files(root: Path) -> dict[str, str]:
    """md5 of every file of the stages' DVC-cached outputs (models, datasets), by path."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values()
    outs = [root / out for stage in stages for out in stage["outs"] if isinstance(out, str)]
    files = [f for out in outs for f in sorted(out.rglob("*")) if f.is_file()]
    assert len(files) > 10, files
    return {str(f.relative_to(root)): hashlib.md5(f.read_bytes()).hexdigest() for f in files}


def mtimes(root: Path) -> dict[str, int]:
    return {path: (root / path).stat().st_mtime_ns for path in cached_files(root)}


def one_error(out: str) -> str:
    """The one ERROR line of a failed dvc command (and no traceback)."""
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "Traceback" not in out, out
    return errors[0]


@dataclass
class Team:
    first: Path  # the clone that reproduced the pipeline and pushed
    origin: Path  # its git remote (a bare repository)
    endpoint: str  # the S3-compatible server
    url: str  # the DVC remote on it
    outputs: dict[str, str]  # md5 of the committed outputs' files


@pytest.fixture(scope="module")
def team(project, s3_server) -> Team:
    """The reproduced tiny pipeline with a DVC remote on the test server (URL committed, endpoint and keys in
    .dvc/config.local), its outputs committed, pushed with the run cache, and a bare git repository as origin."""
    s3 = s3_server
    url = make_bucket(s3, "aigid-team") + "/dvc"
    run("dvc", "remote", "add", "-d", "storage", url, cwd=project)
    use_remote(project, s3)
    run("git", "add", "-A", cwd=project)
    run("git", "commit", "-qm", "pipeline outputs; the team's DVC remote", cwd=project)
    assert "files pushed" in run("dvc", "push", "--run-cache", cwd=project)
    assert "config.local" not in run("git", "ls-files", ".dvc", cwd=project)  # the keys stay out of git
    origin = project.parent / "origin.git"
    run("git", "clone", "-q", "--bare", str(project), str(origin), cwd=project.parent)
    run("git", "remote", "add", "origin", str(origin), cwd=project)
    return Team(project, origin, s3, url, cached_files(project))


def clone(team: Team, dest: Path) -> Path:
    run("git", "clone", "-q", str(team.origin), str(dest), cwd=dest.parent)
    return dest


@pytest.fixture(scope="module")
def experiment(team) -> dict:
    """EXPERIMENT run in the first clone and shared with `dvc exp push --run-cache origin`: its metrics and
    outputs as the first clone has them."""
    sets = [arg for key, value in EXPERIMENT.items() if key != "name" for arg in ("-S", f"{key}={value}")]
    out = run("dvc", "exp", "run", "-n", EXPERIMENT["name"], *sets, cwd=team.first)
    assert {s for s in STAGES if f"Running stage '{s}'" in out} == {
        "features",
        "pseudolabel",
        "retrain",
        "evaluate",
        "export",
    }, out
    run("dvc", "exp", "push", "--run-cache", "origin", EXPERIMENT["name"], cwd=team.first)
    metrics = json.loads((team.first / "metrics/evaluate.json").read_text())
    return {"metrics": metrics, "outputs": cached_files(team.first)}


def test_a_fresh_clone_pulls_the_outputs_reruns_nothing_and_detects(team, tmp_path):
    second = clone(team, tmp_path / "second")
    use_remote(second, team.endpoint)
    run("dvc", "pull", cwd=second)
    assert cached_files(second) == team.outputs
    assert "Data and pipelines are up to date." in run("dvc", "status", cwd=second)
    before = mtimes(second)
    out = run("dvc", "repro", cwd=second)
    assert "Running stage" not in out and all(f"Stage '{s}' didn't change, skipping" in out for s in STAGES), out
    assert mtimes(second) == before

    # The pulled detector (the exported one) scores a test image.
    image = tmp_path / "test.png"
    image.write_bytes(open_dataset(second / "data/prepared")["test"][0]["Image"]["bytes"])
    out = tmp_path / "rows.json"  # stderr says once that the demo model's scores say nothing about real images
    detect = ("aigid", "detect", str(image), "--model", "models/portable", "--format", "json", "-q", "--out", str(out))
    run(*detect, cwd=second)
    (row,) = json.loads(out.read_text())
    assert row["error"] == "" and 0.0 <= row["prob_ai"] <= 1.0 and row["generator"], row


def _experiment_row(shown: list, name: str) -> dict:
    """The entry of experiment ``name`` in `dvc exp show --json`."""
    found = [
        rev
        for baseline in shown
        for exp in baseline.get("experiments") or []
        for rev in exp["revs"]
        if rev.get("name") == name
    ]
    assert len(found) == 1, json.dumps(shown)[:2000]
    return found[0]["data"]


def test_an_experiment_travels_between_clones_with_exp_push_and_exp_pull(team, experiment, tmp_path):
    other = clone(team, tmp_path / "other")
    use_remote(other, team.endpoint)
    run("dvc", "exp", "pull", "origin", EXPERIMENT["name"], cwd=other)
    data = _experiment_row(json.loads(run("dvc", "exp", "show", "--json", cwd=other)), EXPERIMENT["name"])
    assert data["params"]["params.yaml"]["data"]["threshold"] == EXPERIMENT["threshold"]
    assert data["metrics"]["metrics/evaluate.json"]["data"] == experiment["metrics"]

    run("dvc", "exp", "apply", EXPERIMENT["name"], cwd=other)  # its outputs, from the DVC remote
    assert cached_files(other) == experiment["outputs"] != team.outputs
    assert json.loads((other / "metrics/evaluate.json").read_text()) == experiment["metrics"]
    assert "Data and pipelines are up to date." in run("dvc", "status", cwd=other)


def test_ci_remote_step_restores_every_stage_of_a_fresh_clone_and_keeps_the_keys_out_of_git(team, tmp_path):
    fresh = clone(team, tmp_path / "ci")
    remote = {"DVC_REMOTE_URL": team.url, "DVC_REMOTE_ENDPOINT": team.endpoint, **S3_KEYS}
    out = run("bash", str(REPO / ".ci/remote"), "repro", cwd=fresh, **remote)  # dvc repro --pull
    assert "Running stage" not in out, out
    assert all(f"Pulling data for stage: '{s}'" in out or f"Stage '{s}' didn't change" in out for s in STAGES), out
    assert cached_files(fresh) == team.outputs
    assert "Data and pipelines are up to date." in run("dvc", "status", cwd=fresh)
    assert run("git", "status", "--porcelain", cwd=fresh) == ""  # nothing for git
    local = (fresh / ".dvc/config.local").read_text()
    assert f"url = {team.url}" in local and f"endpointurl = {team.endpoint}" in local
    assert f"access_key_id = {S3_KEYS['AWS_ACCESS_KEY_ID']}" in local

    assert "not pushing (DVC_REMOTE_PUSH is not true)" in run(
        "bash", str(REPO / ".ci/remote"), "push", cwd=fresh, **remote
    )
    pushed = run("bash", str(REPO / ".ci/remote"), "push", cwd=fresh, DVC_REMOTE_PUSH="true", **remote)
    assert "files pushed" in pushed, pushed  # dvc push --run-cache: the run cache's entries, sent again
    assert "Cache and remote 'ci' are in sync." in run("dvc", "status", "--cloud", cwd=fresh)
    # Without DVC_REMOTE_URL (a fork): a plain `dvc repro`, nothing pulled or pushed.
    plain = run("bash", str(REPO / ".ci/remote"), "repro", cwd=fresh, DVC_REMOTE_URL="")
    assert "DVC remote: none" in plain and "Pulling" not in plain and "Running stage" not in plain, plain
    assert "nothing pushed" in run("bash", str(REPO / ".ci/remote"), "push", cwd=fresh, DVC_REMOTE_PUSH="true")


def test_the_pulled_run_cache_restores_a_stage_computed_in_another_clone(team, experiment, tmp_path):
    """The experiment's features stage (features.batch_size=64) ran in the first clone only; here the same
    params are restored from the run cache it pushed instead of running."""
    fresh = clone(team, tmp_path / "fresh")
    use_remote(fresh, team.endpoint)
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    params["features"]["batch_size"] = EXPERIMENT["features.batch_size"]
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("dvc", "pull", "--run-cache", cwd=fresh)
    out = run("dvc", "repro", cwd=fresh)
    assert "Stage 'features' is cached - skipping run, checking out outputs" in out, out
    assert "Running stage" not in out, out
    assert cached_files(fresh) == team.outputs  # the stage's output is the same directory
    assert "Data and pipelines are up to date." in run("dvc", "status", cwd=fresh)


def _add_data(root: Path) -> tuple[Path, Path]:
    """A new file under DVC (not on the remote yet): the file and its object in the local cache."""
    path = root / "extra/notes.bin"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(os.urandom(65536))
    run("dvc", "add", "extra/notes.bin", cwd=root)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return path, root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def _nothing_lost(root: Path, path: Path, obj: Path, before: dict[str, str], content: bytes) -> None:
    assert path.read_bytes() == content and obj.read_bytes() == content
    assert cached_files(root) == before
    assert "Data and pipelines are up to date." in run("dvc", "status", cwd=root)


def test_a_remote_that_is_down_or_lacks_the_bucket_is_one_line_and_loses_nothing(team):
    root, down = team.first, f"http://127.0.0.1:{free_port()}"  # nothing listens there
    path, obj = _add_data(root)
    content, before = path.read_bytes(), cached_files(root)
    try:
        run("dvc", "remote", "modify", "--local", "storage", "endpointurl", down, cwd=root)
        error = one_error(run("dvc", "push", cwd=root, ok=False))
        assert "Could not connect to the endpoint URL" in error and down in error, error
        _nothing_lost(root, path, obj, before, content)
    finally:
        run("dvc", "remote", "modify", "--local", "storage", "endpointurl", team.endpoint, cwd=root)
    try:  # the server, but a bucket it does not have
        run("dvc", "remote", "modify", "--local", "storage", "url", "s3://no-such-bucket/dvc", cwd=root)
        assert "The specified bucket does not exist" in one_error(run("dvc", "push", cwd=root, ok=False))
        _nothing_lost(root, path, obj, before, content)
    finally:
        run("dvc", "remote", "modify", "--local", "--unset", "storage", "url", cwd=root)
    assert "new:" in run("dvc", "status", "--cloud", cwd=root)  # the server back: the file is not there yet
    assert "1 file pushed" in run("dvc", "push", cwd=root)
    assert "Cache and remote 'storage' are in sync." in run("dvc", "status", "--cloud", cwd=root)


def _auth(endpoint: str, free_requests: str) -> None:
    """Moto checks credentials (IAM) after ``free_requests`` more requests ("inf": never)."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=free_requests.encode(), headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).close()


def _iam_keys(endpoint: str) -> tuple[str, str]:
    """A user allowed every S3 action, and its access key, made by the three free requests."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        aws_access_key_id="-",
        aws_secret_access_key="-",
        region_name=S3_KEYS["AWS_DEFAULT_REGION"],
    )
    iam.create_user(UserName="team")
    iam.put_user_policy(
        UserName="team",
        PolicyName="s3",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        ),
    )
    key = iam.create_access_key(UserName="team")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_a_remote_that_refuses_the_credentials_is_one_line_and_loses_nothing(team):
    root = team.first
    path, obj = _add_data(root)
    content, before = path.read_bytes(), cached_files(root)
    _auth(team.endpoint, "3")
    try:
        keys = _iam_keys(team.endpoint)  # from now on the server checks every request's keys
        error = one_error(run("dvc", "push", cwd=root, ok=False))  # .dvc/config.local: keys it does not know
        assert "Forbidden" in error and "403" in error, error
        _nothing_lost(root, path, obj, before, content)
        use_remote(root, team.endpoint, (keys[0], "not-" + keys[1]))  # a wrong secret
        assert "Forbidden" in one_error(run("dvc", "push", cwd=root, ok=False))
        use_remote(root, team.endpoint, keys)  # the right keys
        assert "1 file pushed" in run("dvc", "push", cwd=root)
    finally:
        _auth(team.endpoint, "inf")
        use_remote(root, team.endpoint)
    assert "Cache and remote 'storage' are in sync." in run("dvc", "status", "--cloud", cwd=root)


def test_ci_report_lists_only_the_metrics_that_moved_more_than_the_tolerance(team, tmp_path):
    repo = clone(team, tmp_path / "report")  # metrics, params and plots are in git: no pull needed
    path = repo / "metrics/evaluate.json"
    metrics = json.loads(path.read_text())
    small, large, gone = "retrained.task_a.f1_weighted", "retrained.roc_auc", "base.roc_auc"
    metrics["retrained"]["task_a"]["f1_weighted"] += 0.004
    metrics["retrained"]["roc_auc"] += 0.03
    del metrics["base"]["roc_auc"]
    path.write_text(json.dumps(metrics, indent=2))

    def report(**extra: str) -> str:
        return run("bash", str(REPO / ".ci/report"), "HEAD", cwd=repo, PLOTS_DIR=str(tmp_path / "plots"), **extra)

    def listed(out: str) -> set[str]:
        return {name for name in (small, large, gone) if f"| metrics/evaluate.json | {name} |" in out}

    default = report()
    assert listed(default) == {small, large, gone} and "METRICS_TOLERANCE" not in default, default
    assert "## Params against HEAD\n\nNone differs." in default and (tmp_path / "plots/index.html").is_file()
    tolerant = report(METRICS_TOLERANCE="0.01")
    assert listed(tolerant) == {large, gone}, tolerant  # a metric that disappears is always listed
    assert "1 other metric(s) changed by at most 0.01 (METRICS_TOLERANCE), not listed." in tolerant
    proc = subprocess.run(
        ["bash", str(REPO / ".ci/report"), "HEAD"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env(METRICS_TOLERANCE="-1"),
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "METRICS_TOLERANCE must be a number >= 0 (got '-1')\n"
