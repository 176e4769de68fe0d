"""Loading a detector for scoring: of a torch detector and its exported form, the quicker for this machine
(:func:`quickest`), loaded once (:func:`scorer`). `aigid detect`, `aigid app` and the registered model
(:mod:`aigid.serving.pyfunc`) all score through here, so that they give the same rows."""

from __future__ import annotations

import os
from pathlib import Path

from aigid.core.data import DataError
from aigid.core.stage import quiet_transformers
from aigid.detector.scores import Scoring, score_rows
from aigid.serving.portable import PortableDetector, is_portable


def scorer(model_dir: Path, batch_size: int, progress: bool, precision: str):
    """``score(images, captions, threshold) -> rows`` for the detector in ``model_dir``, loaded, by its rule
    (``threshold`` None) or at one cut."""
    rule = Scoring.load(model_dir)
    if is_portable(model_dir):
        if precision == "bf16":
            raise DataError(
                f"{model_dir}: a portable detector runs in float32; --precision bf16 needs a model "
                f"directory written by train or retrain"
            )
        portable = PortableDetector(model_dir)
        return lambda images, texts, threshold: score_rows(
            *portable.logits(images, texts, batch_size, progress), portable.class_names, texts, rule, threshold
        )
    from aigid.detector.infer import RunOptions, score_images  # torch: a portable model never imports it
    from aigid.detector.model import load_detector
    from aigid.detector.runtime import configure

    quiet_transformers()
    configure()
    detector = load_detector(model_dir, precision)
    options = RunOptions(batch_size, progress=progress)
    return lambda images, texts, threshold: score_images(detector, images, texts, rule, threshold, options)


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible to this process, asked of the driver without importing torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def quickest(torch_dir: Path, portable_dir: Path | None, precision: str, missing: str) -> tuple[Path, str]:
    """Of a torch detector and its exported form, the quicker for this machine, and why. On a CPU that is the
    exported detector (onnxruntime, no torch to import: a one-image run takes a fraction of a second instead of
    seconds); where a GPU is visible, for ``--precision bf16`` (which only a torch model runs), or without an
    exported form (``missing`` says why), the torch one."""
    if portable_dir is None or not is_portable(portable_dir):
        return torch_dir, missing
    if precision == "bf16":
        return torch_dir, "--precision bf16 needs a torch model"
    if gpu_present():
        return torch_dir, "a GPU is present"
    return portable_dir, "the exported detector: the quickest on a CPU"
