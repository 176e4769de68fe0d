"""The child processes: every measurement runs in a process of its own (``benchmark.py --child STEP ...``), so
that its peak memory is its own and no measurement inherits another's threads, caches or allocator state.

The parent runs :func:`measure` for each (config, size) pair; the child runs :func:`child`, which prints the
step's results as one line of JSON for :func:`run_child` to read back.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

from bench.common import CONFIGS, compute_profile

ENTRY = Path(__file__).resolve().parents[1] / "benchmark.py"
# step: (its module in bench, its function, the child's arguments it takes)
STEPS = {
    "source": ("prepare", "child_source", ("work", "config", "scale")),
    "prepare": ("prepare", "child_prepare", ("work", "crop")),
    "encoders": ("prepare", "child_encoders", ("work", "config")),
    "train": ("train", "child_train", ("work", "config", "steps", "epochs")),
    "infer": ("infer", "child_infer", ("work", "config", "workers")),
    "preprocess": ("preprocess", "child_preprocess", ("work",)),
    "detect": ("detect", "child_detect", ("work",)),
    "decode": ("decode", "child_decode", ("work",)),
}


def run_child(args: list[str]) -> dict:
    """Run one step in a child process and return the results it printed."""
    proc = subprocess.run([sys.executable, str(ENTRY), "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(config: str, scale: int, steps: int, workers: int, root: Path) -> dict:
    """Every measurement of one (config, size) pair, in order: each step reads what the ones before it wrote
    under ``root/config-scale``. Preprocessing and detect run at size N only (their rates do not depend on
    it), the epoch comparison and reading big images for scoring (decode) for demo at size N only."""
    work = root / f"{config}-{scale}"
    work.mkdir(parents=True, exist_ok=True)
    common = ["--work", str(work), "--config", config]
    epochs = ["--epochs"] if config == "demo" and scale == 1 else []
    result = {"config": config, "scale": scale}
    result.update(run_child(["source", *common, "--scale", str(scale)]))
    result.update(run_child(["prepare", *common, "--crop", str(CONFIGS[config]["image_size"])]))
    run_child(["encoders", *common])
    result.update(run_child(["train", *common, "--steps", str(steps), *epochs]))
    result.update(run_child(["infer", *common, "--workers", str(workers)]))
    if scale == 1:
        result.update(run_child(["preprocess", *common]))
        result.update(run_child(["detect", *common]))
        if config == "demo":  # on the detector the detect step exported
            result.update(run_child(["decode", *common]))
    return result


def child(argv: list[str]) -> None:
    """In the child process: run the step ``argv`` names and print its results as JSON."""
    a = _child_args(argv)
    _quiet()
    from aigid.detector.runtime import configure

    configure(compute_profile())
    module, function, names = STEPS[a.step]
    step = getattr(importlib.import_module(f"bench.{module}"), function)  # that module only
    out = step(*(getattr(a, name) for name in names))
    print(json.dumps(out))


def _child_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--config")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", action="store_true")
    return parser.parse_args(argv)


def _quiet() -> None:
    """No progress bars or warnings on the child's output: its last line is the JSON the parent reads."""
    import logging

    import datasets
    import transformers

    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
