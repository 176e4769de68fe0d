"""Process-wide compute settings, applied once when a command starts, and the inference precision.

- CPU: one intra-op thread per core this process may run on (cgroup/affinity aware; torch's own default can
  count the host's cores inside a container). DataLoader workers run with one thread each (torch's default
  there), so decoding in workers does not fight the model's threads. OMP_NUM_THREADS, when set, wins.
- CUDA: TF32 matmuls and convolutions (Ampere and later); bf16 autocast in training
  (``TrainingArguments(bf16=...)``) and, by default, in inference (:func:`autocast`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from .config import PRECISIONS

log = logging.getLogger(__name__)


def cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure() -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (otherwise it is emulated, slower than float32)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the check
        return False


def autocast(dev: torch.device, precision: str = "auto"):
    """The context the model runs in for ``precision`` (one of :data:`PRECISIONS`) on ``dev``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and dev.type != "cuda"):
        return contextlib.nullcontext()
    if dev.type == "cpu" and not cpu_has_bf16():
        _warn_emulated()
    return torch.autocast(dev.type, dtype=torch.bfloat16)


@functools.cache
def _warn_emulated() -> None:
    log.warning("precision bf16: this CPU has no bf16 instructions, so bf16 is emulated and slower than fp32")
