"""Process-wide compute settings, applied once when a command starts, and the inference precision.

- The stages run under params.yaml's ``compute`` profile (:mod:`aigid.core.compute`): a fixed CPU thread count, and
  with ``compute.reproducible`` pinned instruction sets and torch's deterministic algorithms, so that their
  numbers are the same on every machine. :func:`configure` checks that what must be set before torch is
  imported is in force.
- Without a profile (`aigid detect`): one intra-op thread per core this process may run on (cgroup/affinity
  aware; torch's own default can count the host's cores inside a container); OMP_NUM_THREADS, when set, wins.
  DataLoader workers run with one thread each (torch's default there), so decoding in workers does not fight
  the model's threads.
- CUDA, unless reproducible: TF32 matmuls and convolutions (Ampere and later); bf16 autocast in training
  (``TrainingArguments(bf16=...)``) and, by default, in inference (:func:`autocast`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

from aigid.core.compute import PINNED_CAPABILITY, environment
from aigid.core.errors import ParamsError
from aigid.core.precision import PRECISIONS

log = logging.getLogger(__name__)


def cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure(compute=None) -> None:
    """Set this process's compute settings: those of ``compute`` (params.yaml's group), or the defaults above.

    A profile whose environment is not in force (torch was imported before it was set: see
    :mod:`aigid.core.compute`), or one that asks for AVX2 on a processor without it, stops the stage with one line.
    """
    if compute is not None:
        _check_in_force(compute)
    if compute is not None and compute.threads:
        torch.set_num_threads(compute.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())
    if compute is not None and compute.reproducible:
        torch.use_deterministic_algorithms(True)
        # oneDNN picks its blocking from the processor's cache sizes and has no mode that fixes them (MKL's
        # does: MKL_CBWR); without it, ATen runs convolutions as matmuls through MKL.
        torch.backends.mkldnn.enabled = False
    elif torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _check_in_force(compute) -> None:
    wanted = environment(compute.device, compute.threads, compute.reproducible)
    missing = [f"{k}={v!r}" for k, v in wanted.items() if os.environ.get(k) != v]
    if missing:
        raise ParamsError(
            f"compute: the profile needs {', '.join(missing)} in the environment before torch is "
            "imported (`aigid <stage>` sets it from params.yaml; a caller importing torch itself "
            "sets it first)"
        )
    capability = torch.backends.cpu.get_cpu_capability()
    if compute.reproducible and capability != PINNED_CAPABILITY:
        raise ParamsError(
            f"compute.reproducible: torch runs {capability} kernels, not {PINNED_CAPABILITY} "
            "(a processor without AVX2, or torch imported before the profile was set); "
            "set compute.reproducible: false to run here, with other numbers"
        )


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (otherwise it is emulated, slower than float32): the CPU's
    own flags as Linux lists them (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``); False where they cannot
    be read."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {word for line in cpuinfo.splitlines() if line.startswith(("flags", "Features")) for word in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _lower_dtype(dev: torch.device, precision: str) -> torch.dtype | None:
    """The dtype autocast runs in for ``precision`` (one of :data:`PRECISIONS`) on ``dev``; None: float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and dev.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(dev: torch.device, precision: str = "auto"):
    """The context the model runs in for ``precision`` (one of :data:`PRECISIONS`) on ``dev``."""
    dtype = _lower_dtype(dev, precision)
    if dtype is None:
        return contextlib.nullcontext()
    if dev.type == "cpu" and not cpu_has_bf16():
        _warn_emulated()
    return torch.autocast(dev.type, dtype=dtype)


# The layers whose weights autocast casts to its lower precision (torch's lists for CPU and CUDA hold linear and
# the convolutions). Other parameters (embeddings, layer norms) stay float32, as autocast runs them.
_AUTOCAST_LOWERED = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
)


def weights_for(model: torch.nn.Module, dev: torch.device, precision: str) -> None:
    """For a model loaded to score at ``precision`` on ``dev``: where :func:`autocast` runs in bf16, the weights
    it casts (those of linear layers and convolutions) are stored in bf16 from the start, instead of being cast
    again by every autocast region (the cast is dropped when a region ends). Outputs do not change: autocast
    leaves a bf16 weight as it is and rounds a float32 one to the same bf16 value."""
    dtype = _lower_dtype(dev, precision)
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, _AUTOCAST_LOWERED):
                module.to(dtype)


@functools.cache
def _warn_emulated() -> None:
    log.warning("precision bf16: this CPU has no bf16 instructions, so bf16 is emulated and slower than fp32")
