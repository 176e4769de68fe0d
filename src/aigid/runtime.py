"""Process-wide compute settings, applied once when a command starts.

- CPU: one intra-op thread per core this process may run on (cgroup/affinity aware; torch's own default can
  count the host's cores inside a container). DataLoader workers run with one thread each (torch's default
  there), so decoding in workers does not fight the model's threads. OMP_NUM_THREADS, when set, wins.
- CUDA: TF32 matmuls and convolutions (Ampere and later); bf16 autocast is applied where the model runs
  (``infer.autocast``, ``TrainingArguments(bf16=...)``).
"""

from __future__ import annotations

import contextlib
import os

import torch


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


def autocast(dev: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (same numbers as training there)."""
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
