"""The compute profile: the train stage writes the same bytes whatever the machine's core count and vector unit."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from aigid.core import compute
from aigid.core.config import load_params
from aigid.core.errors import ParamsError
from aigid.detector.runtime import configure
from helpers import REPO, aigid, environment, finish, tiny_params_dict

# What another machine would do by itself: the widest vector unit for every library, another thread count.
UNPINNED = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "ALL", "MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "1"}
# An AVX2-only processor, as far as MKL's dispatch can be told (the profile pins ATen's and oneDNN's).
AVX2_MACHINE = {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}
HAS_AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Prepared data and encoders of the tiny configuration; params.yaml with the committed profile,
    unpinned.yaml without one."""
    root = tmp_path_factory.mktemp("compute")
    params = tiny_params_dict()
    params["train"]["epochs"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    params["compute"] = {"device": "cpu", "threads": 0, "reproducible": False}
    (root / "unpinned.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw").mkdir(parents=True)
    for stage in ("prepare", "encoders", "features"):
        finish(aigid(stage, cwd=root))
    return root


def train(root: Path, name: str, params: str = "params.yaml", cores: str | None = None, **env: str) -> dict:
    """`aigid train` into ``name``/ (on ``cores`` only, with ``env`` added to an environment without the
    profile's variables, which conftest set in this process); the digests of what it wrote."""
    out = root / name
    args = [
        "train",
        "--params",
        params,
        "--out",
        f"{name}/model",
        "--metrics",
        f"{name}/metrics.json",
        "--report",
        f"{name}/report.json",
        "--history",
        f"{name}/history.json",
    ]
    taskset = ["taskset", "-c", cores] if cores is not None else []
    profile = compute.environment("cpu", 1, True)
    clean = {k: v for k, v in environment().items() if k not in profile}
    finish(
        subprocess.Popen(
            [*taskset, "aigid", *args],
            cwd=root,
            env={**clean, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
    files = [out / "model/model.safetensors", out / "metrics.json", out / "report.json", out / "history.json"]
    return {f.relative_to(out).as_posix(): hashlib.md5(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.slow
def test_training_writes_the_same_bytes_on_one_core_or_two_and_whatever_the_vector_unit(inputs):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to compare one with two")
    one_core = train(inputs, "one-core", cores="0")
    assert train(inputs, "two-cores-unpinned-env", **UNPINNED) == one_core  # the profile wins over the environment
    assert train(inputs, "avx2-machine", **AVX2_MACHINE) == one_core

    # Without the profile the same run follows the machine: the check above can fail.
    free_one = train(inputs, "free-one-core", params="unpinned.yaml", cores="0")
    free_two = train(inputs, "free-two-cores", params="unpinned.yaml")
    assert free_one["model/model.safetensors"] != free_two["model/model.safetensors"]
    if HAS_AVX512:
        free_avx512 = train(inputs, "free-avx512", params="unpinned.yaml", cores="0", OMP_NUM_THREADS="2")
        assert free_avx512["model/model.safetensors"] != one_core["model/model.safetensors"]


def test_the_environment_of_a_profile():
    env = compute.environment("cpu", 2, True)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["MKL_CBWR"] == "COMPATIBLE"
    assert compute.environment("auto", 0, False) == {}  # the paper's choice: nothing pinned


def test_the_params_file_is_read_from_the_command_line():
    assert compute.params_file(["--data", "d", "--params", "p.yaml"]) == Path("p.yaml")
    assert compute.params_file(["--params=q.yaml"]) == Path("q.yaml")
    assert compute.params_file(["--data", "d"]) == Path("params.yaml")


def test_this_test_process_runs_the_committed_profile():
    params = load_params(REPO / "params.yaml")
    configure(params.compute)  # conftest set the profile before torch was imported
    assert torch.get_num_threads() == params.compute.threads
    assert torch.backends.cpu.get_cpu_capability() == compute.PINNED_CAPABILITY
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.mkldnn.enabled
    assert not torch.cuda.is_available()


def test_a_profile_not_in_force_stops_the_stage_naming_it(monkeypatch):
    params = load_params(REPO / "params.yaml")
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    with pytest.raises(ParamsError, match="compute: the profile needs MKL_CBWR='COMPATIBLE'"):
        configure(params.compute)


def test_the_shipped_configs_choose_their_profile():
    assert load_params(REPO / "params.yaml").compute.reproducible
    paper = load_params(REPO / "configs/paper.yaml").compute
    assert (paper.device, paper.threads, paper.reproducible) == ("auto", 0, False)
