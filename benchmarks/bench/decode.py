"""Memory and speed of reading images for scoring, each surface as a whole process of its own (/usr/bin/time):
`aigid detect --model <portable>` on 6 PNGs of 9000x9000 pixels (small files under the decompression-bomb guard,
about 320 MB each as RGB pixels), the served model's ``predict`` (aigid.serving.pyfunc) and the page's scoring
function (aigid.tools.app.score_uploads) on the same files; and `aigid detect` on 120 random 1024x768 JPEGs.
The detector is the one the detect step saved and exported under ``work`` (``model``, ``portable``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import AIGID, time_process

BIG_SIDE, BIG_FILES = 9000, 6
PHOTOS, PHOTO_SIZE = 120, (1024, 768)

# The served model's predict, as `mlflow models serve` calls it, on the files named on the command line.
PYFUNC = """
import sys
from pathlib import Path
import pandas as pd
from aigid.serving.pyfunc import DetectorModel
model = DetectorModel()
model.load(Path(sys.argv[1]))
frame = model.predict(None, pd.DataFrame({"image": [Path(p).read_bytes() for p in sys.argv[2:]]}))
assert (frame["error"] == "").all(), frame["error"].tolist()
"""
# The page's scoring function (POST /score), on the files named on the command line.
PAGE = """
import sys
from pathlib import Path
from aigid.tools.app import score_uploads
from aigid.serving.portable import decode_side
from aigid.serving.scorer import scorer
score = scorer(Path(sys.argv[1]), 64, False, "auto")
uploads = [(p, Path(p).read_bytes()) for p in sys.argv[2:]]
rows = score_uploads(score, uploads, "", None, decode_side(Path(sys.argv[1])))
assert not any(r["error"] for r in rows), rows
"""


def child_decode(work: Path, repeats: int = 3) -> dict:
    """Peak MB (and wall seconds) of each surface on the big PNGs, and `aigid detect`'s images/s, whole process,
    on the JPEGs (the fastest of ``repeats``)."""
    portable = work / "portable"
    big, photos = _big_pngs(work / "big"), _photos(work / "photos")
    result = {"big_png_file_kb": round(sum(p.stat().st_size for p in big) / len(big) / 1024)}
    surfaces = {
        "detect": [AIGID, "detect", *map(str, big), "--model", str(portable), "-q"],
        "pyfunc": [sys.executable, "-c", PYFUNC, str(portable), *map(str, big)],
        "page": [sys.executable, "-c", PAGE, str(portable), *map(str, big)],
    }
    for name, cmd in surfaces.items():
        wall, _, peak = time_process(cmd)
        result[f"big_png_{name}_mb"], result[f"big_png_{name}_s"] = peak, wall
    cmd = [AIGID, "detect", str(photos), "--model", str(portable), "-q"]
    wall = min(time_process(cmd)[0] for _ in range(repeats))
    result["photos_detect_images_s"] = PHOTOS / wall
    result.update(_reduction_effect(portable, sorted(photos.iterdir())))
    return result


def _reduction_effect(portable: Path, paths: list[Path]) -> dict:
    """How far reduced decoding moves P(AI) and the labels of the portable detector on ``paths``, against the
    same images decoded whole (what scoring did before images were decoded reduced)."""
    from aigid.core.data import decode_rgb
    from aigid.detector.scores import decide
    from aigid.serving.portable import PortableDetector

    detector = PortableDetector(portable)
    side = detector.inputs.preprocess.side
    decisions = []
    for reduce in (None, side):
        chunks = [
            detector.logits([decode_rgb({"path": str(p)}, side=reduce) for p in paths[i : i + 20]], [""] * 20)
            for i in range(0, len(paths), 20)
        ]
        decisions.append(decide(*(np.concatenate(c) for c in zip(*chunks))))
    whole, reduced = decisions
    return {
        "reduced_max_prob_ai_difference": float(np.abs(whole.prob_ai - reduced.prob_ai).max()),
        "reduced_label_agreement": float((whole.label_b == reduced.label_b).mean()),
    }


def _big_pngs(folder: Path) -> list[Path]:
    """BIG_FILES smooth 9000x9000 RGB PNGs (a few hundred KB each), made once; each image is freed before the
    next is made."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"big{i}.png" for i in range(BIG_FILES)]
    for i, path in enumerate(paths):
        if not path.exists():
            ramp = Image.linear_gradient("L").resize((BIG_SIDE, BIG_SIDE))
            Image.merge("RGB", (ramp, ramp.rotate(90 * (i % 4)), ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT))).save(
                path, compress_level=9
            )
    return paths


def _photos(folder: Path) -> Path:
    """PHOTOS random-noise 1024x768 JPEGs (quality 90, the slowest kind to decode), made once."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(PHOTOS):
        path = folder / f"photo{i:03d}.jpg"
        if not path.exists():
            pixels = rng.integers(0, 256, (PHOTO_SIZE[1], PHOTO_SIZE[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
    return folder
