"""The compute profile (params.yaml ``compute``): where and how a stage computes, which its numbers depend on.

Float32 results on a CPU change with the number of threads (ATen keeps one partial result per thread of a
parallel reduction, so a sum is added up in another order) and with the vector instructions the kernels use
(ATen's own kernels, oneDNN's and MKL's each pick the widest the processor has: AVX-512 on one machine, AVX2
on another). So a stage runs with:

- ``threads`` CPU threads: a fixed number, whatever the machine has (0: one per core, or OMP_NUM_THREADS where
  set: faster on a large machine, numbers that follow its core count);
- with ``reproducible``: ATen capped at AVX2; MKL on its one code path that is the same on Intel and AMD
  processors, with fixed cache sizes (``MKL_CBWR=COMPATIBLE``: its other reproducible branches are Intel-only);
  no dynamic thread counts; torch's deterministic algorithms, and oneDNN off (its blocking follows the
  processor's cache sizes; capped at AVX2 all the same) (:func:`aigid.detector.runtime.configure`);
- with ``device: cpu``, no GPU: CUDA is hidden from torch.

Each library reads its variable once, when it is first used, so they are set before torch is imported: by the
`aigid` command line for a pipeline stage (:func:`apply`, before the stage's module is imported), by the
caller otherwise (the tests' conftest.py). :func:`aigid.detector.runtime.configure` then checks that the profile is in
force, and stops the stage naming what is not, rather than computing other numbers.

This module imports neither torch nor the params models: the command line reads it before either.
"""

from __future__ import annotations

import os
from pathlib import Path

DEVICES = ("cpu", "auto")
# reproducible: the variables each library reads when first used, and the values that give one result on every
# x86-64 processor with AVX2 (Intel or AMD).
PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels (reductions, activations, softmax, ...)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN, should anything still call it (runtime.configure turns it off)
    "MKL_CBWR": "COMPATIBLE",  # MKL (float32 matmuls)
    "MKL_DYNAMIC": "FALSE",  # exactly the threads asked for, whatever the load
    "OMP_DYNAMIC": "FALSE",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS on a GPU (torch's deterministic mode needs it)
}
# What ATen reports (torch.backends.cpu.get_cpu_capability()) when PINNED is in force.
PINNED_CAPABILITY = "AVX2"


def environment(device: str, threads: int, reproducible: bool) -> dict[str, str]:
    """The environment variables of a profile (see the module's docstring)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    if reproducible:
        env.update(PINNED)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def params_file(args: list[str]) -> Path:
    """The params file a stage's command line names (``--params FILE``), or its default."""
    for i, arg in enumerate(args):
        if arg == "--params" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--params="):
            return Path(arg.split("=", 1)[1])
    return Path("params.yaml")


def apply(path: Path) -> None:
    """Set the environment of the ``compute`` group of params file ``path`` in this process, for the libraries to
    read when they load. A file or group that cannot be read is left to the stage, which validates the params
    and names the key."""
    import yaml

    try:
        group = yaml.safe_load(path.read_text())["compute"]
        env = environment(str(group["device"]), int(group["threads"]), bool(group["reproducible"]))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return
    os.environ.update(env)
