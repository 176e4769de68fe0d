"""`aigid detect` on a folder: one row per file, unreadable files reported, scores equal to batch predictions."""

import csv
import io

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import CLIPImageProcessor

from aigid.cli import main
from aigid.encoders import train_wordpiece
from aigid.model import decide, load_detector, save_detector
from test_model import _tiny_detector


def save_tiny_model(path):
    torch.manual_seed(0)
    save_detector(_tiny_detector().eval(), train_wordpiece(["a red circle"], 50),
                  CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}), path)


def test_detect_folder_with_a_corrupt_file(tmp_path):
    save_tiny_model(tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    modes = {"rgb.png": "RGB", "rgba.png": "RGBA", "gray.jpg": "L", "cmyk.jpg": "CMYK", "big.png": "RGB"}
    for name, mode in modes.items():
        size = (300, 200) if name == "big.png" else (20, 20)
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        img.save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    result = CliRunner().invoke(main, ["detect", str(folder), "--model", str(tmp_path / "model"),
                                       "--caption", "a red circle", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(io.StringIO(result.output))}
    assert set(rows) == set(modes) | {"broken.png"}
    assert "not a recognised image format" in rows["broken.png"]["error"] and rows["broken.png"]["prob_ai"] == ""

    model, tokenizer, processor = load_detector(tmp_path / "model")
    names = sorted(modes)                                    # detect walks a folder in sorted order
    images = [Image.open(folder / n).convert("RGB") for n in names]
    with torch.no_grad():
        out = model(**tokenizer(["a red circle"] * len(names), return_tensors="pt", padding=True),
                    pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    expected = decide(out.logits_a, out.logits_b)
    for i, name in enumerate(names):
        row = rows[name]
        assert abs(float(row["prob_ai"]) - float(expected.prob_ai[i])) < 1e-5
        assert row["generator"] == model.config.class_names[int(expected.label_b[i])]
        probs = [float(row[f"p_{n}"]) for n in model.config.class_names]
        assert abs(sum(probs) - 1) < 1e-5


def test_detect_json_with_per_file_captions(tmp_path):
    import json

    save_tiny_model(tmp_path / "model")
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / name)
    (tmp_path / "captions.csv").write_text("path,caption\na.png,a red circle\n")
    result = CliRunner().invoke(main, ["detect", str(tmp_path / "*.png"), "--model", str(tmp_path / "model"),
                                       "--captions", str(tmp_path / "captions.csv"), "--format", "json",
                                       "--threshold", "0.9"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["caption"] for r in rows] == ["a red circle", ""] and all(r["threshold"] == 0.9 for r in rows)
    (tmp_path / "bad.csv").write_text("file,text\na.png,x\n")
    result = CliRunner().invoke(main, ["detect", str(tmp_path / "a.png"), "--model", str(tmp_path / "model"),
                                       "--captions", str(tmp_path / "bad.csv")])
    assert result.exit_code != 0 and "needs columns path,caption" in result.output
