"""Score your own images: files, folders or globs, with or without captions, in batches."""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset, Features, Image, Value

from .data import DataError, decode_rgb
from .infer import predict_logits
from .model import decide, load_detector

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def expand(inputs: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images, globs expanded; order kept, no repeats."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            found += matches or [path]  # a missing file is reported as a row, not dropped
    return list(dict.fromkeys(found))


def score_images(model, tokenizer, processor, images: list[bytes], captions: list[str], threshold: float = 0.5,
                 batch_size: int = 64, progress: bool = False, precision: str = "auto") -> list[dict]:
    """Score encoded images (already known to decode) in batches: one row of scores per image.

    Class probabilities are joint: P(real) = 1 - P(AI) and P(generator) = P(AI) * P(generator | AI).
    """
    names = list(model.config.class_names)
    ds = Dataset.from_dict({"Caption": list(captions), "Image": [{"bytes": b, "path": None} for b in images]},
                           features=Features({"Caption": Value("string"), "Image": Image(decode=False)}))
    logits_a, logits_b = predict_logits(model, tokenizer, processor, ds, batch_size, progress=progress,
                                        precision=precision)
    pred = decide(torch.from_numpy(logits_a), torch.from_numpy(logits_b), threshold)
    rows = []
    for i, caption in enumerate(captions):
        p_ai = float(pred.prob_ai[i])
        row = {"prob_ai": p_ai, "label": "ai" if pred.label_a[i] else "real",
               "generator": names[int(pred.label_b[i])], "threshold": threshold, "caption": caption}
        row.update({f"p_{n}": (1 - p_ai) if k == 0 else p_ai * float(pred.probs_b[i, k]) for k, n in enumerate(names)})
        rows.append(row)
    return rows


def detect(paths: list[Path], model_dir: Path, captions: dict[str, str] | None = None, caption: str = "",
           threshold: float = 0.5, batch_size: int = 64, progress: bool = False,
           precision: str = "auto") -> list[dict]:
    """One row per path: P(AI), the decision at ``threshold``, the generator and every class probability.

    A file that cannot be read gets a row with its ``error`` and no scores; the rest are still scored.
    ``progress`` shows bars (files checked, batches scored) on stderr.
    """
    from tqdm import tqdm

    model, tokenizer, processor = load_detector(model_dir)
    captions = captions or {}
    rows, images, texts = [], [], []
    for path in tqdm(paths, desc="reading", unit="file", file=sys.stderr, disable=not progress):
        row = {"path": str(path), "error": ""}
        try:
            data = path.read_bytes()
            decode_rgb({"bytes": data}, str(path))
        except (OSError, DataError) as err:
            row["error"] = str(err)
        else:
            texts.append(captions.get(str(path), captions.get(path.name, caption)))
            images.append(data)
        rows.append(row)
    if images:
        good = [r for r in rows if not r["error"]]
        for row, scores in zip(good, score_images(model, tokenizer, processor, images, texts, threshold, batch_size,
                                                  progress, precision)):
            row.update(scores)
    return rows


def threshold_from(spec: str) -> float:
    """The operating-point threshold in an evaluate metrics file: ``FILE`` (the retrained model's entry) or
    ``FILE:MODEL`` (``base`` or ``retrained``)."""
    path, _, name = spec.rpartition(":")
    if name not in ("base", "retrained"):
        path, name = spec, "retrained"
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read an evaluate metrics file ({err})") from None
    try:
        return float(metrics[name]["operating_point"]["threshold"])
    except (KeyError, TypeError):
        raise DataError(f"{path}: no {name}.operating_point.threshold (written by `aigid evaluate`)") from None


def resolve_model(spec: str) -> Path:
    """A model directory, or ``models:/<name>/<version|latest>`` from the MLflow registry, downloaded."""
    if not spec.startswith("models:/"):
        path = Path(spec)
        if not path.is_dir():
            raise DataError(f"{spec}: no such model directory")
        return path
    import mlflow

    from .tracking import check_reachable, tracking_uri

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec))
    except Exception as err:  # the registry raises several types; all mean "cannot get this model"
        raise DataError(f"{spec}: cannot download the model from {uri} ({type(err).__name__}: {err})") from None
    found = [p.parent for p in local.rglob("model.safetensors")]
    if len(found) != 1:
        raise DataError(f"{spec}: expected one detector directory in the model's artifacts, found {len(found)}")
    return found[0]


def read_captions(path: Path) -> dict[str, str]:
    """A ``path,caption`` CSV as {path: caption}; paths as given on the command line or bare file names."""
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    if table and not {"path", "caption"} <= set(table[0]):
        raise DataError(f"{path}: needs columns path,caption (found: {', '.join(table[0])})")
    return {r["path"]: r["caption"] for r in table}


def render(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
