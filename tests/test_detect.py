"""`aigid detect` on a folder: one row per file, unreadable files reported, scores equal to batch predictions."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from aigid.cli import main
from aigid.core.data import Collator
from aigid.detector.model import load_detector
from aigid.detector.scores import DEMO_NOTICE, Scoring
from helpers import TINY_SCORING, save_tiny_model


def test_detect_folder_with_a_corrupt_file(tmp_path):
    save_tiny_model(tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    modes = {
        "rgb.png": "RGB",
        "rgba.png": "RGBA",
        "gray.jpg": "L",
        "cmyk.jpg": "CMYK",
        "big.png": "RGB",
        "tiny.png": "RGB",
        "palette.gif": "P",
    }
    sizes = {"big.png": (2400, 1600), "tiny.png": (1, 1)}
    for name, mode in modes.items():
        w, h = sizes.get(name, (20, 20))
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
        img.save(folder / name)
    # 16-bit grayscale PNG: Pillow opens it as "I;16"; it must be scaled to 8 bits, not clipped to white.
    Image.fromarray((rng.integers(0, 65535, (24, 24))).astype(np.uint16)).save(folder / "gray16.png")
    modes["gray16.png"] = "I;16"
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    result = CliRunner().invoke(
        main,
        ["detect", str(folder), "--model", str(tmp_path / "model"), "--caption", "a red circle", "--batch-size", "2"],
    )
    assert result.exit_code == 3, result.output  # some inputs could not be read
    assert result.stderr.strip() == "1 of 9 input(s) could not be read (the error column says why)"
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert set(rows) == set(modes) | {"broken.png"}
    assert "not a recognised image format" in rows["broken.png"]["error"] and rows["broken.png"]["prob_ai"] == ""

    model, tokenizer, processor, _ = load_detector(tmp_path / "model")
    names = sorted(modes)  # detect walks a folder in sorted order
    # The training collator's batch: detect decodes each image as training does (big.png reduced by 50 to 48x32).
    rows_in = [{"Caption": "a red circle", "Image": {"path": str(folder / n)}} for n in names]
    batch = Collator(tokenizer, processor, model.config.max_text_length)(rows_in)
    with torch.no_grad():
        out = model(**batch)
    expected = Scoring.load(tmp_path / "model").decide(out.logits_a, out.logits_b)  # its calibration and verdict
    for i, name in enumerate(names):
        row = rows[name]
        assert abs(float(row["prob_ai"]) - float(expected.prob_ai[i])) < 1e-5
        assert row["verdict"] == expected.verdict[i] and float(row["threshold"]) == 0.52
        assert row["generator"] == model.config.class_names[int(expected.label_b[i])]
        probs = [float(row[f"p_{n}"]) for n in model.config.class_names]
        assert abs(sum(probs) - 1) < 1e-5


def test_detect_json_with_per_file_captions(tmp_path):
    import json

    save_tiny_model(tmp_path / "model")
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / name)
    (tmp_path / "captions.csv").write_text("path,caption\na.png,a red circle\n")
    result = CliRunner().invoke(
        main,
        [
            "detect",
            str(tmp_path / "*.png"),
            "--model",
            str(tmp_path / "model"),
            "--captions",
            str(tmp_path / "captions.csv"),
            "--format",
            "json",
            "--threshold",
            "0.9",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["caption"] for r in rows] == ["a red circle", ""] and all(r["threshold"] == 0.9 for r in rows)
    (tmp_path / "bad.csv").write_text("file,text\na.png,x\n")
    result = CliRunner().invoke(
        main,
        [
            "detect",
            str(tmp_path / "a.png"),
            "--model",
            str(tmp_path / "model"),
            "--captions",
            str(tmp_path / "bad.csv"),
        ],
    )
    assert result.exit_code == 1 and "missing column(s) path" in result.output


def test_threshold_from_the_operating_point_and_progress_only_on_stderr(tmp_path, capsys):
    import json

    from aigid.tools.detect import detect, expand

    save_tiny_model(tmp_path / "model")
    for i in range(3):
        Image.new("RGB", (20, 20), (200, 30 * i, 30)).save(tmp_path / f"{i}.png")
    (tmp_path / "evaluate.json").write_text(
        json.dumps(
            {"base": {"operating_point": {"threshold": 0.25}}, "retrained": {"operating_point": {"threshold": 0.75}}}
        )
    )
    args = ["detect", str(tmp_path / "*.png"), "--model", str(tmp_path / "model"), "--format", "json"]
    runner = CliRunner()
    rows = json.loads(runner.invoke(main, args + ["--threshold-from", str(tmp_path / "evaluate.json")]).output)
    assert [r["threshold"] for r in rows] == [0.75] * 3
    assert all(r["label"] == ("ai" if r["prob_ai"] >= 0.75 else "real") for r in rows)
    rows = json.loads(runner.invoke(main, args + ["--threshold-from", f"{tmp_path / 'evaluate.json'}:base"]).output)
    assert [r["threshold"] for r in rows] == [0.25] * 3
    both = runner.invoke(main, args + ["--threshold", "0.3", "--threshold-from", str(tmp_path / "evaluate.json")])
    assert both.exit_code != 0 and "not both" in both.output
    missing = runner.invoke(main, args + ["--threshold-from", str(tmp_path / "model" / "config.json")])
    assert missing.exit_code != 0 and "retrained.operating_point.threshold" in missing.output

    quiet = detect(expand([str(tmp_path / "*.png")]), tmp_path / "model")
    capsys.readouterr()
    shown = detect(expand([str(tmp_path / "*.png")]), tmp_path / "model", progress=True)
    captured = capsys.readouterr()
    assert shown == quiet and "scoring" in captured.err and captured.out == ""


def test_unknown_model_directory_or_registered_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Set through monkeypatch: MLflow writes the URI it is given into the environment, this undoes it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    result = CliRunner().invoke(main, ["detect", "a.png", "--model", "no/such/dir"])
    assert result.exit_code != 0 and "no/such/dir: no such model directory" in result.output
    result = CliRunner().invoke(main, ["detect", "a.png", "--model", "models:/aigid-detector/7"])
    assert result.exit_code != 0 and "models:/aigid-detector/7: cannot download the model" in result.output
    result = CliRunner().invoke(main, ["detect", "a.png", "--model", "models:/aigid-detector@candidate"])
    assert result.exit_code != 0 and "`aigid register` registers models/retrained" in result.output


def test_precision_bf16_runs_the_model_in_bf16_on_the_cpu_and_auto_keeps_float32(tmp_path):
    import json

    from aigid.detector.runtime import autocast

    cpu = torch.device("cpu")
    x = torch.randn(4, 8)
    with autocast(cpu, "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16
    for precision in ("auto", "fp32"):
        with autocast(cpu, precision):
            assert (x @ x.T).dtype == torch.float32

    save_tiny_model(tmp_path / "model")
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    args = [
        "detect",
        str(tmp_path / "*.png"),
        "--model",
        str(tmp_path / "model"),
        "--format",
        "json",
        "--caption",
        "a red circle",
    ]
    prob = {
        p: np.array([r["prob_ai"] for r in json.loads(CliRunner().invoke(main, args + ["--precision", p]).output)])
        for p in ("auto", "fp32", "bf16")
    }
    assert np.array_equal(prob["auto"], prob["fp32"])
    assert 0 < np.abs(prob["bf16"] - prob["fp32"]).max() < 0.05  # bf16 ran, and stays close
    bad = CliRunner().invoke(main, args + ["--precision", "fp16"])
    assert bad.exit_code != 0 and "fp16" in bad.output


def test_detect_imports_no_dataset_table_tracking_params_or_model_library():
    """`datasets`, pandas, MLflow, scikit-learn and the params models (pydantic) cost a one-image `aigid detect`
    seconds of importing, so its module must not pull them in; nor torch and transformers, which it imports only
    to score with a torch model (a portable one needs neither: tests/test_portable.py)."""
    import subprocess
    import sys

    heavy = (
        "datasets",
        "pyarrow",
        "pandas",
        "mlflow",
        "sklearn",
        "pydantic",
        "aigid.core.config",
        "torch",
        "transformers",
    )
    code = f"import sys, aigid.cli, aigid.tools.detect; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _project_models(root, tiny_models):
    """A project's two scoring models: models/retrained and the exported models/portable."""
    shutil.copytree(tiny_models / "model", root / "models/retrained")
    shutil.copytree(tiny_models / "portable", root / "models/portable")
    Image.new("RGB", (16, 16), "red").save(root / "red.png")


def test_without_model_detect_scores_with_the_exported_detector_on_a_cpu_and_says_so(
    tmp_path, monkeypatch, tiny_models
):
    from aigid.serving import scorer

    _project_models(tmp_path, tiny_models)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scorer, "gpu_present", lambda: False)
    default = CliRunner().invoke(main, ["detect", "red.png", "--format", "json"])
    assert default.exit_code == 0, default.output
    assert default.stderr.splitlines()[0] == (
        "scoring with models/portable (the exported detector: the quickest on a CPU; --model chooses another)"
    )
    chosen = CliRunner().invoke(main, ["detect", "red.png", "--format", "json", "--model", "models/portable"])
    assert chosen.stdout == default.stdout and chosen.stderr == ""
    torch_model = CliRunner().invoke(main, ["detect", "red.png", "--format", "json", "--model", "models/retrained"])
    assert abs(json.loads(torch_model.stdout)[0]["prob_ai"] - json.loads(default.stdout)[0]["prob_ai"]) < 1e-5


@pytest.mark.parametrize(
    "gpu, precision, remove_portable, why",
    [
        (True, "auto", False, "a GPU is present"),
        (False, "bf16", False, "--precision bf16 needs a torch model"),
        (False, "auto", True, "models/portable is not there (the export stage writes it)"),
    ],
)
def test_without_model_detect_scores_with_the_torch_model_where_it_is_the_one_to_use(
    tmp_path, monkeypatch, tiny_models, gpu, precision, remove_portable, why
):
    from aigid.serving import scorer

    _project_models(tmp_path, tiny_models)
    if remove_portable:
        shutil.rmtree(tmp_path / "models/portable")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scorer, "gpu_present", lambda: gpu)
    result = CliRunner().invoke(main, ["detect", "red.png", "--precision", precision])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == f"scoring with models/retrained ({why}; --model chooses another)"


def test_the_verdict_uses_the_models_own_thresholds_and_a_threshold_is_one_cut(tmp_path):
    """Without --threshold: ai at or above the model's threshold, real below its lower one, unsure between (the
    tiny model's rule: 0.52 and 0.48 at temperature 1.7); with it, one cut and no unsure."""
    rule = dict(TINY_SCORING, verdict={"threshold": 0.6, "lower": 0.2, "target_fpr": 0.05, "target_fnr": 0.05})
    save_tiny_model(tmp_path / "model", rule)
    rng = np.random.default_rng(3)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    args = ["detect", str(tmp_path / "*.png"), "--model", str(tmp_path / "model"), "--format", "json"]
    rows = json.loads(CliRunner().invoke(main, args).stdout)
    for r in rows:
        want = "ai" if r["prob_ai"] >= 0.6 else "real" if r["prob_ai"] < 0.2 else "unsure"
        assert r["verdict"] == want and r["threshold"] == 0.6 and r["label"] == ("ai" if want == "ai" else "real")
    assert "unsure" in {r["verdict"] for r in rows}
    cut = json.loads(CliRunner().invoke(main, args + ["--threshold", "0.4"]).stdout)
    assert [r["prob_ai"] for r in cut] == [r["prob_ai"] for r in rows]  # the same calibrated P(AI)
    assert all(r["verdict"] == ("ai" if r["prob_ai"] >= 0.4 else "real") for r in cut)


def test_a_model_trained_on_the_demo_or_without_a_rule_says_so_once_per_run(tmp_path):
    save_tiny_model(tmp_path / "demo", dict(TINY_SCORING, trained_on={"source": "demo", "synthetic": True}))
    save_tiny_model(tmp_path / "old", None)
    for i in range(3):
        Image.new("RGB", (20, 20), (200, 30 * i, 30)).save(tmp_path / f"{i}.png")
    images = str(tmp_path / "*.png")
    demo = CliRunner().invoke(main, ["detect", images, "--model", str(tmp_path / "demo")])
    assert demo.exit_code == 0 and demo.stderr == f"note: {DEMO_NOTICE}\n"
    old = CliRunner().invoke(main, ["detect", images, "--model", str(tmp_path / "old")])
    assert old.exit_code == 0 and old.stderr.count("note:") == 1 and "uncalibrated" in old.stderr
    assert {r["verdict"] for r in csv.DictReader(io.StringIO(old.stdout))} <= {"real", "ai"}


def test_files_decoded_in_parallel_give_the_rows_of_one_thread_in_their_order(tmp_path, monkeypatch):
    from aigid.tools import detect as detect_module

    save_tiny_model(tmp_path / "model")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(9):
        w, h = [(20, 20), (900, 300), (64, 700)][i % 3]
        path = tmp_path / f"{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "4.png").write_bytes(b"not an image")
    rows = {}
    for threads in (1, 4):
        monkeypatch.setattr(detect_module, "DECODE_THREADS", threads)
        rows[threads] = detect_module.detect(paths, tmp_path / "model", caption="a red circle", batch_size=2)
    assert rows[4] == rows[1]
    assert [r["path"] for r in rows[4]] == [str(p) for p in paths]
    assert [bool(r["error"]) for r in rows[4]] == [i == 4 for i in range(9)]


def test_a_pipe_or_a_device_is_a_row_error_at_once(tmp_path, tiny_models):
    """Reading /dev/zero never ends and opening a pipe waits for a writer: each is refused before it is opened
    (the run is bounded: were either read, it would be stopped after 300 s and fail). Files are read alike for
    either kind of model; the portable one spares the process importing torch."""
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "ok.png")
    aigid = str(Path(sys.executable).with_name("aigid"))
    model = tiny_models / "portable"
    command = [aigid, "detect", str(pipe), "/dev/zero", str(tmp_path / "ok.png"), "--model", str(model)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["error"] for r in rows] == [
        f"{pipe}: not a regular file (a pipe, socket or device)",
        "/dev/zero: not a regular file (a pipe, socket or device)",
        "",
    ]
