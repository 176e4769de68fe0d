"""Score your own images: files, folders or globs, with or without captions, in batches."""

from __future__ import annotations

import csv
import glob
import io
import json
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


def detect(paths: list[Path], model_dir: Path, captions: dict[str, str] | None = None, caption: str = "",
           threshold: float = 0.5, batch_size: int = 64) -> list[dict]:
    """One row per path: P(AI), the decision at ``threshold``, the generator and every class probability.

    Class probabilities are joint: P(real) = 1 - P(AI) and P(generator) = P(AI) * P(generator | AI). A file
    that cannot be read gets a row with its ``error`` and no scores; the rest are still scored.
    """
    model, tokenizer, processor = load_detector(model_dir)
    names = list(model.config.class_names)
    captions = captions or {}
    rows, good = [], {"Caption": [], "Image": [], "source_file": []}
    for path in paths:
        row = {"path": str(path), "error": ""}
        try:
            data = path.read_bytes()
            decode_rgb({"bytes": data}, str(path))
        except (OSError, DataError) as err:
            row["error"] = str(err)
        else:
            good["Caption"].append(captions.get(str(path), captions.get(path.name, caption)))
            good["Image"].append({"bytes": data, "path": None})
            good["source_file"].append(str(path))
        rows.append(row)
    scored = [r for r in rows if not r["error"]]
    if scored:
        ds = Dataset.from_dict(good, features=Features({"Caption": Value("string"), "Image": Image(decode=False),
                                                        "source_file": Value("string")}))
        logits_a, logits_b = predict_logits(model, tokenizer, processor, ds, batch_size)
        pred = decide(torch.from_numpy(logits_a), torch.from_numpy(logits_b), threshold)
        for i, row in enumerate(scored):
            p_ai = float(pred.prob_ai[i])
            row.update(prob_ai=p_ai, label="ai" if pred.label_a[i] else "real", generator=names[int(pred.label_b[i])],
                       threshold=threshold, caption=good["Caption"][i])
            row.update({f"p_{n}": (1 - p_ai) if k == 0 else p_ai * float(pred.probs_b[i, k])
                        for k, n in enumerate(names)})
    return rows


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
