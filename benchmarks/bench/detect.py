"""`aigid detect one.jpg` as a whole process, since its start-up (imports, loading the model) is most of what a
user waits for: on this config's detector saved as train saves it (torch) and as `aigid export` exports it
(portable: onnxruntime, no torch); and the portable detector's images/s on the pool split."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

from PIL import Image

from aigid.core.data import open_dataset
from aigid.detector.model import save_detector
from aigid.serving.portable import PortableDetector
from bench.common import AIGID, detector, params_file, stage_options, time_process


def child_detect(work: Path, repeats: int = 5) -> dict:
    """Wall seconds, CPU seconds and peak MB of `aigid detect one.jpg` (the fastest of ``repeats``) without
    ``--model`` in a project holding both models (what a user runs: the default it picks for this machine), on
    the portable and on the torch detector, and of `aigid detect --help` (the command's start: its imports, no
    model); the portable detector's images/s (batch 64, float32) and the export stage's own check."""
    model_dir, portable_dir, image = work / "model", work / "portable", work / "one.jpg"
    report = _save_and_export(work, model_dir, portable_dir)
    _write_jpeg_1024(_first_image(work), image)
    result = {"export_" + k: v for k, v in report.items()}
    project = work / "project"  # models/retrained and models/portable, where `aigid detect` looks without --model
    (project / "models").mkdir(parents=True, exist_ok=True)
    for name, target in (("retrained", model_dir), ("portable", portable_dir)):
        link = project / "models" / name
        if not link.exists():
            link.symlink_to(target.resolve())
    for key, cmd in (
        ("detect_default_s", [AIGID, "detect", str(image.resolve()), "-q"]),
        ("detect_s", [AIGID, "detect", str(image), "--model", str(portable_dir), "-q"]),
        ("detect_torch_s", [AIGID, "detect", str(image), "--model", str(model_dir), "-q"]),
        ("detect_import_s", [AIGID, "detect", "--help"]),
    ):
        best = min(time_process(cmd, project if key == "detect_default_s" else None) for _ in range(repeats))
        result[key], result[key.replace("_s", "_cpu_s")], result[key.replace("_s", "_mb")] = best
    result["portable_images_s"] = _portable_rate(work, portable_dir)
    return result


def _save_and_export(work: Path, model_dir: Path, portable_dir: Path) -> dict:
    """The config's detector saved (torch) and exported by `aigid export` (portable); the export's report."""
    loaded = detector(work)
    save_detector(loaded.model, loaded.tokenizer, loaded.processor, model_dir)
    report = work / "export.json"
    options = {"model": model_dir, "data": work / "prepared", "out": portable_dir, "report": report}
    cmd = [AIGID, "export", "--params", str(params_file(work / "params.yaml")), *stage_options(options)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(report.read_text())


def _first_image(work: Path) -> bytes:
    return open_dataset(work / "prepared")["unlabeled"][0]["Image"]["bytes"]


def _write_jpeg_1024(data: bytes, path: Path) -> None:
    """One image as the real dataset's are: a 1024 px JPEG."""
    with Image.open(io.BytesIO(data)) as img:
        img.convert("RGB").resize((1024, 1024), Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)


def _portable_rate(work: Path, portable_dir: Path) -> float:
    """Images/s of the portable detector on the pool split, in one call, after a warm-up on 64 rows."""
    pool = open_dataset(work / "prepared")["unlabeled"]
    images, captions = [r["bytes"] for r in pool["Image"]], [c or "" for c in pool["Caption"]]
    portable = PortableDetector(portable_dir)
    portable.logits(images[:64], captions[:64])  # warm-up
    start = time.perf_counter()
    portable.logits(images, captions)
    return len(images) / (time.perf_counter() - start)
