"""Datasets and the training collator (aigid.core.data): perturbations applied to decoded images, 16-bit
images."""

import numpy as np
from PIL import Image

from aigid.core.data import Collator, to_rgb
from aigid.stages.evaluate import Perturbation
from helpers import _Recorder


def _rows(n):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return [
        {"Caption": f"caption {i}", "Image": {"bytes": buf.getvalue()}, "Label_A": 1, "Label_B": 1} for i in range(n)
    ]


def _collate(rows, **kw):
    rec = _Recorder()
    Collator(rec, rec, 16, **kw)(rows)
    return rec


def test_collator_applies_the_perturbation_to_decoded_images():
    rec = _collate(_rows(2), perturb=Perturbation("resize", 2))
    assert [im.size for im in rec.images] == [(16, 16), (16, 16)]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    img = Image.open(tmp_path / "g16.png")
    assert img.mode.startswith("I;16")
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert abs(rgb[..., 0].mean() - ramp.mean() / 257) < 1  # a plain convert("RGB") gives ~255
