"""The portable detector: `aigid export` writes the detector as ONNX; `aigid detect` scores it without torch,
as the torch detector scores (inputs prepared the same way, the same decision rule, the same logits)."""

import csv
import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import CLIPImageProcessorPil

from aigid.cli import main
from aigid.core.errors import DataError
from aigid.detector.model import load_detector
from aigid.serving.portable import GRAPH, WEIGHTS, Inputs, PortableDetector, Preprocessor
from helpers import save_tiny_model


def _images() -> list[Image.Image]:
    """Wide, tall, square, smaller than the crop, noisy and smooth: every branch of resize and crop."""
    rng = np.random.default_rng(0)
    sizes = [(300, 200), (120, 333), (224, 224), (10, 7), (1024, 1023), (17, 16)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:4]]
    y, x = np.mgrid[0:1023, 0:1024]
    images.append(Image.fromarray(np.stack([x / 4 % 256, y / 4 % 256, (x + y) / 8 % 256], -1).astype(np.uint8)))
    images.append(Image.new("RGB", sizes[5], (200, 30, 30)))
    return images


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}},
        {"size": {"height": 40, "width": 30}, "crop_size": {"height": 24, "width": 20}},
        {"resample": 2, "do_normalize": False},
    ],
)
def test_image_steps_are_the_pil_processors_to_the_last_bit(tmp_path, settings):
    CLIPImageProcessorPil(**settings).save_pretrained(tmp_path)
    ours = Preprocessor(tmp_path / "preprocessor_config.json")(_images())
    theirs = CLIPImageProcessorPil.from_pretrained(tmp_path)(images=_images(), return_tensors="np")["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("settings", [{"size": {"shortest_edge": 224, "longest_edge": 300}}, {"do_resize": False}])
def test_an_image_step_it_does_not_implement_is_refused_naming_the_file(tmp_path, settings):
    CLIPImageProcessorPil(**settings).save_pretrained(tmp_path)
    with pytest.raises(DataError, match="preprocessor_config.json: size .* is not supported"):
        Preprocessor(tmp_path / "preprocessor_config.json")


def test_captions_are_tokenised_as_the_detectors_tokenizer_does(tmp_path):
    save_tiny_model(tmp_path / "model")
    detector = load_detector(tmp_path / "model")
    captions = ["a red circle", "", "A RED circle, unseen words: zebra!", " ".join(["red circle"] * 80)]
    ours = Inputs(tmp_path / "model")([Image.new("RGB", (16, 16))] * len(captions), captions)
    theirs = detector.tokenizer(
        captions, padding=True, truncation=True, max_length=detector.model.config.max_text_length, return_tensors="np"
    )
    assert ours["input_ids"].shape[1] == detector.model.config.max_text_length  # the long caption was truncated
    assert np.array_equal(ours["input_ids"], theirs["input_ids"])
    assert np.array_equal(ours["attention_mask"], theirs["attention_mask"])


def test_the_graph_scores_as_torch_for_any_batch_and_caption_length(tiny_models):
    detector = load_detector(tiny_models / "model")
    assert (tiny_models / "portable" / GRAPH).is_file() and (tiny_models / "portable" / WEIGHTS).is_file()
    portable = PortableDetector(tiny_models / "portable")
    rng = np.random.default_rng(2)
    for rows, caption in ((1, ""), (5, "a red circle " * 10), (3, "red")):
        images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(rows)]
        inputs = portable.inputs(images, [caption] * rows)
        ours = portable.session.run(["logits_a", "logits_b"], inputs)
        with torch.no_grad():
            out = detector.model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        assert np.allclose(ours[0], out.logits_a.numpy(), atol=1e-5)
        assert np.allclose(ours[1], out.logits_b.numpy(), atol=1e-5)


def test_detect_on_a_portable_model_imports_no_torch_and_scores_as_the_torch_model(tmp_path, tiny_models):
    rng = np.random.default_rng(3)
    for i in range(3):  # the processor's own size: both paths see the very same pixels
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    code = (
        "import atexit, sys; atexit.register(lambda: print([m for m in ('torch', 'transformers') "
        "if m in sys.modules], file=sys.stderr)); sys.argv = ['aigid', *sys.argv[1:]]; "
        "from aigid.cli import main; main()"
    )
    args = ["detect", str(tmp_path / "*.png"), "--caption", "a red circle", "--batch-size", "2"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--model", str(tiny_models / "portable")], capture_output=True, text=True
    )
    assert proc.returncode == 3, proc.stderr  # one input could not be read
    assert proc.stderr.splitlines()[-1] == "[]"  # neither torch nor transformers was imported
    portable = {r["path"]: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    reference = CliRunner().invoke(main, [*args, "--model", str(tiny_models / "model")])
    assert reference.exit_code == 3
    expected = {r["path"]: r for r in csv.DictReader(io.StringIO(reference.stdout))}
    assert list(portable) == list(expected) and len(portable) == 4
    for path, row in expected.items():
        ours = portable[path]
        assert ours["error"] == row["error"] and (ours["label"], ours["generator"]) == (row["label"], row["generator"])
        for key in ["prob_ai", *(k for k in row if k.startswith("p_"))] if not row["error"] else []:
            assert abs(float(ours[key]) - float(row[key])) < 1e-5, key


def test_a_broken_portable_model_or_bf16_on_it_is_one_clear_line(tmp_path, tiny_models):
    shutil.copytree(tiny_models / "portable", tmp_path / "portable")
    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    result = CliRunner().invoke(
        main, ["detect", str(tmp_path / "red.png"), "--model", str(tmp_path / "portable"), "--precision", "bf16"]
    )
    assert result.exit_code == 1 and "a portable detector runs in float32" in result.output
    (tmp_path / "portable" / GRAPH).write_bytes(b"truncated")
    result = CliRunner().invoke(main, ["detect", str(tmp_path / "red.png"), "--model", str(tmp_path / "portable")])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert f"{tmp_path / 'portable' / GRAPH}: onnxruntime cannot load it" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_omp_num_threads_is_the_graphs_thread_count_as_spark_sets_it_per_task(tiny_models, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert PortableDetector(tiny_models / "portable").session.get_session_options().intra_op_num_threads == 0  # default
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert PortableDetector(tiny_models / "portable").session.get_session_options().intra_op_num_threads == 1
