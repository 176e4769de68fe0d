"""Stages under faults: training killed mid-run resumes; with its tracking store away it fails before any work;
against a real MLflow server it logs there; a full disk or a read-only folder stops a stage with one line naming
it, and the outputs of the run before stay as they were."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import aigid, environment, finish, free_port, mlflow_server, tiny_params_dict

pytestmark = pytest.mark.slow


def last_complete_checkpoint_in(root: Path):
    from aigid.training.trainer import is_complete

    for checkpoint in (root / "checkpoints").glob("train/*/checkpoint-*"):
        if is_complete(checkpoint, checkpoint.parent.name, 1):  # the folder is named by the fingerprint
            return checkpoint
    return None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    params = tiny_params_dict()
    params["train"]["epochs"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw").mkdir(parents=True)  # the raw data folder prepare depends on
    finish(aigid("prepare", cwd=root))
    finish(aigid("encoders", cwd=root))
    return root


def test_sigkill_mid_training_then_rerun_resumes_and_matches_an_unbroken_run(inputs, tmp_path):
    finish(aigid("train", "--out", "models/unbroken", "--metrics", "unbroken.json", "--history", "h1.json", cwd=inputs))
    assert not (inputs / "checkpoints").exists()  # cleaned when the stage completes

    proc = aigid("train", "--out", "models/killed", "--metrics", "killed.json", "--history", "h2.json", cwd=inputs)
    deadline = time.time() + 300
    while last_complete_checkpoint_in(inputs) is None and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (inputs / "models/killed").exists() and not (inputs / "killed.json").exists()

    out = finish(
        aigid("train", "--out", "models/killed", "--metrics", "killed.json", "--history", "h2.json", cwd=inputs)
    )
    assert "resuming train from the last checkpoint" in out
    unbroken = json.loads((inputs / "unbroken.json").read_text())
    resumed = json.loads((inputs / "killed.json").read_text())
    assert resumed == pytest.approx(unbroken)
    h1, h2 = (json.loads((inputs / name).read_text()) for name in ("h1.json", "h2.json"))
    assert len(h1) == len(h2) == 4
    for epoch_unbroken, epoch_resumed in zip(h1, h2):
        assert epoch_resumed == pytest.approx(epoch_unbroken)


def test_unreachable_tracking_server_fails_before_any_training(inputs):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.time()
    proc = aigid("train", "--out", "models/never", "--metrics", "never.json", cwd=inputs, MLFLOW_TRACKING_URI=uri)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and f"MLflow tracking server {uri} is not reachable" in out
    assert "Traceback" not in out and time.time() - started < 60
    assert not (inputs / "models/never").exists() and not (inputs / "checkpoints").exists()


def test_unusable_sqlite_store_fails_before_any_training(inputs, tmp_path):
    # MLflow creates a missing directory for a sqlite file, so the store is placed under a regular file instead.
    (tmp_path / "not-a-dir").write_text("")
    uri = f"sqlite:///{tmp_path / 'not-a-dir' / 'mlflow.db'}"
    proc = aigid("train", "--out", "models/never", "--metrics", "never.json", cwd=inputs, MLFLOW_TRACKING_URI=uri)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and f"MLflow tracking store {uri} is not usable" in out
    assert "Traceback" not in out
    assert not (inputs / "models/never").exists() and not (inputs / "checkpoints").exists()


def test_training_logs_to_a_real_mlflow_server(inputs, tmp_path):
    import mlflow

    with mlflow_server(tmp_path / "server.db", str(tmp_path / "artifacts"), environment()) as (uri, _):
        finish(
            aigid(
                "train",
                "--out",
                "models/served",
                "--metrics",
                "served.json",
                "--history",
                "h3.json",
                cwd=inputs,
                MLFLOW_TRACKING_URI=uri,
            )
        )
        mlflow.set_tracking_uri(uri)
        (run,) = mlflow.search_runs(experiment_names=["aigid"], output_format="list")
        assert run.data.tags["stage"] == "train" and run.data.params["train.epochs"] == "4"
        assert {"f1_weighted_a", "f1_weighted_b", "history/f1_weighted_a"} <= set(run.data.metrics)


def in_own_mount_namespace(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the bash ``script`` in a mount namespace of its own, as root of a user namespace (so also for a user
    without privileges): the small filesystems and read-only folders it mounts vanish with it."""
    return subprocess.run(
        ["unshare", "--map-root-user", "--mount", "bash", "-euc", script],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _mounts_allowed() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return in_own_mount_namespace("mount -t tmpfs -o size=1m tmpfs /mnt", Path("/")).returncode == 0
    except OSError:
        return False


needs_mounts = pytest.mark.skipif(not _mounts_allowed(), reason="this machine refuses mount namespaces (unshare)")

PREPARE = "aigid prepare --raw raw --out out/prepared --report out/prepare.json --quarantine out/quarantine.csv"
# Leaves the filesystem of out/ 100 kB: less than the prepared data set needs again.
FILL = "head -c $(( $(stat -f -c '%a*%S' out) - 100000 )) /dev/zero > out/filler"
FAULTS = {
    "full": (FILL, "out/prepared: No space left on device"),
    "read-only": ("mount --bind out out && mount -o remount,bind,ro out", "Read-only file system"),
}


@needs_mounts
@pytest.mark.parametrize("fault", FAULTS)
def test_a_full_disk_or_read_only_folder_is_one_line_and_the_earlier_outputs_stay(tmp_path, fault):
    make, reason = FAULTS[fault]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    (tmp_path / "raw").mkdir()
    (tmp_path / "out").mkdir()
    files = "find out -type f ! -name filler -exec sha256sum {} + | sort"
    script = f"""
        mount -t tmpfs -o size=4m tmpfs out
        {PREPARE}
        {files} > before.txt
        {make}
        {PREPARE} > failed.txt 2>&1 && exit 9
        {files} > after.txt
        ls -A out > listing.txt
        """
    proc = in_own_mount_namespace(script, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    failed = (tmp_path / "failed.txt").read_text()
    assert "Traceback" not in failed and failed.endswith("\n") and reason in failed.splitlines()[-1], failed
    assert failed.splitlines()[-1].startswith("Error: prepare: out/"), failed
    before = (tmp_path / "before.txt").read_text()
    assert (tmp_path / "after.txt").read_text() == before and "out/prepared/dataset_dict.json" in before
    # nothing half-written: no temporary, no scratch folder beside the outputs
    listing = set((tmp_path / "listing.txt").read_text().split())
    assert listing - {"filler"} == {"prepared", "prepare.json", "quarantine.csv"}


@needs_mounts
@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_a_full_disk_reported_as_another_error_is_a_full_disk(tmp_path, writer):
    # torch.save and safetensors raise RuntimeError and SafetensorError on a full disk, with no errno
    save = {
        "torch": "torch.save({'w': torch.zeros(100_000)}, tmp / 'w.pt')",
        "safetensors": "safetensors.torch.save_file({'w': torch.zeros(100_000)}, tmp / 'w.safetensors')",
    }[writer]
    code = f"""
import errno, safetensors.torch, torch
from aigid.core.files import atomic_path
with atomic_path('out/model') as tmp:
    tmp.mkdir()
    (tmp / 'config.json').write_text('{{}}')
try:
    with atomic_path('out/model') as tmp:
        tmp.mkdir()
        {save}
except OSError as err:
    assert err.errno == errno.ENOSPC and err.filename == 'out/model', err
    print('reported', type(err.__cause__).__name__)
"""
    (tmp_path / "out").mkdir()
    (tmp_path / "write.py").write_text(code)
    proc = in_own_mount_namespace("mount -t tmpfs -o size=100k tmpfs out && python write.py && ls -A out", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [
        "reported",
        {"torch": "RuntimeError", "safetensors": "SafetensorError"}[writer],
        "model",
    ]


@needs_mounts
def test_a_disk_that_fills_while_a_checkpoint_is_saved_is_one_line(inputs):
    (inputs / "checkpoints").mkdir()
    try:
        args = "--out models/full --metrics full.json --report full-report.json --history full-history.json"
        proc = in_own_mount_namespace(
            f"mount -t tmpfs -o size=64k tmpfs checkpoints && aigid train {args} 2>&1 | tail -1", inputs
        )
    finally:
        shutil.rmtree(inputs / "checkpoints")
    assert proc.stdout.startswith("Error: train: checkpoints/train/"), proc.stdout + proc.stderr
    assert proc.stdout.endswith(": No space left on device\n")
    assert not (inputs / "models/full").exists() and not (inputs / "full.json").exists()
