"""Datasets and the training collator (aigid.core.data): perturbations applied to decoded images, 16-bit
images."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from aigid.core.data import REDUCE_MARGIN, Collator, DataError, decode_rgb, to_rgb
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


def _encoded(img: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt", "size", "reduced"),
    [
        ("RGB", "JPEG", (2000, 1500), (125, 94)),  # libjpeg at 1/8 (250x188), then halved
        ("L", "JPEG", (2000, 1500), (125, 94)),
        ("CMYK", "JPEG", (1500, 2000), (94, 125)),
        ("RGB", "PNG", (2000, 1500), (87, 66)),  # reduce by 23 (1500 // 64)
        ("P", "PNG", (1500, 2000), (66, 87)),
        ("RGBA", "PNG", (200, 120), (200, 120)),  # below twice 2 x 64: kept whole
        ("RGBA", "PNG", (200, 130), (100, 65)),
    ],
)
def test_reduced_decode_keeps_twice_the_encoders_side_in_rgb(mode, fmt, size, reduced):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    decoded = decode_rgb(_encoded(img, fmt), side=32)
    assert decoded.mode == "RGB" and decoded.size == reduced
    assert min(decoded.size) >= REDUCE_MARGIN * 32 or decoded.size == size
    whole = decode_rgb(_encoded(img, fmt))
    assert whole.mode == "RGB" and whole.size == size


def test_a_big_jpeg_is_decoded_small_without_its_whole_pixels(tmp_path):
    """A 8000x6000 JPEG (192 MB as RGB pixels) decoded for a 32 px encoder: libjpeg decodes it at 1/8 (1000x750, then
    reduced by 11), so the
    process never holds its whole pixels; decoded whole, it does (what makes the check able to fail)."""
    Image.new("L", (8000, 6000), 90).save(tmp_path / "big.jpg", quality=90)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from aigid.core.data import decode_rgb\n"
        "def peak():  # MB; VmHWM is this program's own (ru_maxrss keeps the parent's across exec)\n"
        "    line = next(x for x in Path('/proc/self/status').read_text().splitlines() if x.startswith('VmHWM'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "start = peak()\n"
        "small = decode_rgb({'path': sys.argv[1]}, side=32)\n"
        "reduced = peak() - start\n"
        "whole = decode_rgb({'path': sys.argv[1]})\n"
        "print(small.size, round(reduced), round(peak() - start))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.jpg")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    size, reduced, whole = out.stdout.rsplit(" ", 2)
    assert size == "(91, 69)" and int(reduced) < 20 and int(whole) > 150, out.stdout


def test_training_and_scoring_decode_each_image_alike(tmp_path):
    """The training collator, the portable detector's inputs and `aigid detect`'s reading (decode_side of a
    model directory) decode an image to the same reduced pixels."""
    from transformers import CLIPImageProcessor

    from aigid.serving.portable import Preprocessor, decode_side

    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    data = _encoded(Image.fromarray(rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)), "JPEG")
    processor = _Recorder()
    processor.size = {"shortest_edge": 24}
    Collator(_Recorder(), processor, 16)([{"Caption": "", "Image": {"bytes": data}}])
    portable_side = Preprocessor(tmp_path / "preprocessor_config.json").side
    assert portable_side == decode_side(tmp_path) == 24
    scored = decode_rgb(data, side=portable_side)
    assert processor.images[0].size == scored.size == (113, 88)  # 1/8 by libjpeg
    assert np.array_equal(np.asarray(processor.images[0]), np.asarray(scored))


def test_a_path_that_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    """A pipe would wait for a writer and a device be read until memory runs out: each is a DataError at once
    (faulthandler ends the run if reading either ever waits)."""
    import faulthandler

    os.mkfifo(tmp_path / "pipe.png")
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        for path in (tmp_path / "pipe.png", "/dev/zero"):
            with pytest.raises(DataError, match=r"not a regular file \(a pipe, socket or device\)"):
                decode_rgb({"path": str(path)}, str(path), side=32)
    finally:
        faulthandler.cancel_dump_traceback_later()
