"""What the measurements share: the configurations, params.yaml, the compute profile a child runs under and
the detector built from a config's encoders.

This module imports neither torch nor aigid at the top: the parent process reads it before it sets the compute
profile's environment, which torch reads when it is first imported.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

CONFIGS = {
    # captions per split at size N; 4N multiplies every split by 4
    "demo": {
        "image_size": 32,
        "captions": {"train": 200, "validation": 40, "test": 40, "unlabeled": 100},
        "train_batch": 64,
        "baseline_images": 256,
    },
    "paper": {
        "image_size": 224,
        "captions": {"train": 16, "validation": 4, "test": 4, "unlabeled": 16},
        "train_batch": 16,
        "baseline_images": 16,
    },
}
# The reference implementation pads every caption to this many tokens.
BASELINE_TOKENS = 128
REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"
AIGID = str(Path(sys.executable).with_name("aigid"))  # the command a user runs, from this environment


def params():
    """params.yaml, validated as the stages read it."""
    from aigid.core.config import load_params

    return load_params(PARAMS)


def infer_batch() -> int:
    """Inference runs at the batch size the pipeline's scoring stages use (params.yaml, evaluate.batch_size)."""
    import yaml

    return yaml.safe_load(PARAMS.read_text())["evaluate"]["batch_size"]


def params_file(path: Path, **groups: dict) -> Path:
    """params.yaml with ``groups`` merged into its groups of the same name, written to ``path`` (for `aigid
    <stage> --params`), the compute group being the one this child runs under (:func:`compute_profile`)."""
    import yaml

    values = yaml.safe_load(PARAMS.read_text())
    for name, update in {"compute": compute_profile().model_dump(), **groups}.items():
        values[name].update(update)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def stage_options(paths: dict[str, Path]) -> list[str]:
    """``--name path`` for each of a stage's paths."""
    return [word for name, path in paths.items() for word in (f"--{name}", str(path))]


def time_process(cmd: list[str], cwd: Path | None = None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak resident MB of one run of ``cmd`` (/usr/bin/time)."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", *cmd], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    wall, user, system, kib = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), float(user) + float(system), int(kib) / 1024


def peak_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_profile():
    """The compute group a child runs under: params.yaml's (--compute params) or none pinned (--compute free)."""
    from aigid.core.config import Compute

    if os.environ.get("AIGID_BENCHMARK_COMPUTE") == "params":
        return params().compute
    return Compute(device="auto", threads=0, reproducible=False)


def detector(work: Path, precision: str = "fp32"):
    """A fresh detector (aigid's ``Loaded``) on the encoders the `encoders` child saved under ``work``, loaded to
    score at ``precision`` (float32 for training)."""
    from aigid.detector.model import build_detector

    return build_detector(
        str(work / "encoders" / "text"),
        str(work / "encoders" / "vision"),
        512,
        64,
        params().prepare.class_names,
        precision=precision,
    )
