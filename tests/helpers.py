"""Helpers the test modules share: params files, the tiny detector, subprocesses and servers, a registered model,
datasets in the layouts users bring. Test modules import from here, never from one another; the fixtures built on
these are in conftest.py.

This module imports torch: conftest.py applies the compute profile (params.yaml's ``compute``) before importing it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from click.testing import CliRunner
from datasets import Dataset, DatasetDict
from PIL import Image
from transformers import BertConfig, BertModel, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from aigid.cli import main
from aigid.detector.model import Detector, DetectorConfig, save_detector
from aigid.serving.registry import ALIAS
from aigid.sources.demo import train_wordpiece

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ params files

# The committed params.yaml, shrunk: same keys, smaller numbers.
TINY = {
    "prepare": {"demo": {"captions": {"train": 24, "validation": 6, "test": 8, "unlabeled": 10}, "image_size": 32}},
    "encoders": {
        "demo": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 300, "image_size": 32, "patch_size": 8}
    },
    "model": {"fusion_dim": 32},
    "train": {"epochs": 2, "batch_size": 32, "learning_rate": 0.002},
    "threshold": 0.2,  # a barely trained tiny model is never confident; keep some samples anyway
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def tiny_params_dict() -> dict:
    return _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)


def write(tmp_path, over: dict | None = None, text: str | None = None):
    """A params file: the committed params.yaml with ``over`` merged in, or ``text`` as it is."""
    p = tmp_path / "params.yaml"
    if text is None:
        text = yaml.safe_dump(_merge(yaml.safe_load((REPO / "params.yaml").read_text()), over or {}))
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------- the tiny detector

CT2 = ("real", "sd21", "sdxl", "sd3", "dalle3", "midjourney6")


def _tiny_detector(fusion="concat", class_names=CT2):
    text = BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        add_pooling_layer=False,
    )
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=8,
        )
    )
    return Detector(
        DetectorConfig(
            text_encoder_config=text.config,
            vision_encoder_config=vision.config,
            fusion_dim=8,
            class_names=class_names,
            fusion=fusion,
        )
    )


# A scoring rule as train writes one (scoring.json): calibration, the verdict's thresholds, the data's source.
TINY_SCORING = {
    "calibration": {"method": "temperature", "temperature": 1.7, "fit_on": "validation", "rows": 10},
    "verdict": {"threshold": 0.52, "lower": 0.48, "target_fpr": 0.05, "target_fnr": 0.05},
    "trained_on": {
        "source": "data/raw/tiny",
        "synthetic": False,
        "rows": {"train": 10, "validation": 10},
        "params": {},
    },
}


def save_tiny_model(path, scoring: dict | None = TINY_SCORING):
    """The tiny detector saved as train saves one, with ``scoring`` as its scoring.json (None: none)."""
    torch.manual_seed(0)
    save_detector(
        _tiny_detector().eval(),
        train_wordpiece(["a red circle"], 50),
        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        path,
    )
    if scoring is not None:
        (Path(path) / "scoring.json").write_text(json.dumps(scoring))


def export_portable(model_dir, out, captions=("a red circle", "two")):
    """model_dir's detector as a portable directory at ``out`` (what the export stage writes, without its check)."""
    from PIL import Image

    from aigid.detector.model import load_detector
    from aigid.serving.portable import Inputs, write_graph

    detector = load_detector(model_dir)
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "scoring.json"):
        if (model_dir / name).is_file():
            (out / name).write_bytes((model_dir / name).read_bytes())
    example = Inputs(model_dir)([Image.new("RGB", (20, 20), "red")] * len(captions), list(captions))
    write_graph(detector.model, example, out)
    return detector


# ---------------------------------------------------------------------------- commands in a subprocess


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


def aigid(*args: str, cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["aigid", *args], cwd=cwd, env=environment(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


STAGES = tuple(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])  # in dvc.yaml's order


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _run(cmd, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def sh(*cmd: str, cwd: Path) -> str:
    proc = _run(cmd, cwd)
    return proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(cmd: list[str], ready_url: str, **popen):
    """Run a server process until the block ends: ready once ``ready_url`` answers (within 3 minutes); stopped
    with its children (the process group) afterwards. Its output goes to a file (a pipe nobody reads would
    fill up and stall the server), shown when it does not start."""
    import tempfile

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(ready_url, timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        log.seek(0)
                        raise AssertionError(f"{' '.join(cmd[:3])} did not start:\n{log.read().decode()}") from None
                    time.sleep(0.5)
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(db: Path, artifacts: str, env: dict[str, str], port: int | None = None):
    """`mlflow server` on 127.0.0.1 (a free port unless given) with a sqlite backend at ``db`` and artifacts proxied
    to ``artifacts`` (a directory or an s3:// URL), run with ``env``; yields its URI and process."""
    import sys

    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", artifacts]
    with local_server(cmd, f"{uri}/health", env=env) as proc:
        yield uri, proc


# Credentials of the test S3 server (moto accepts any; these are the ones the tests pass and check for).
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def make_bucket(endpoint: str, name: str) -> str:
    """Create bucket ``name`` on the S3 server at ``endpoint``; returns ``s3://name``."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_KEYS["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=name)
    return f"s3://{name}"


# ------------------------------------------------------------------------------ the registered model

NAME = "aigid-detector"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _versions():
    return sorted(mlflow.MlflowClient().search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))


def _candidate() -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(NAME, ALIAS).version)


def _report(threshold: float, balanced_accuracy: float = 0.8) -> dict:
    """An evaluate report holding the numbers registration logs (every headline key)."""
    scores = {
        "task_a": {"f1_weighted": 0.9, "balanced_accuracy": balanced_accuracy},
        "task_b": {"f1_weighted": 0.7, "f1_macro": 0.6},
        "roc_auc": 0.95,
        "operating_point": {"threshold": threshold, "test_tpr": 0.9},
        "calibration": {"ece": 0.03},
        "verdict": {"test_coverage": 0.8},
    }
    return {"contaminated": False, "base": scores, "retrained": scores}


CARD = "---\nlibrary_name: aigid\n---\n\n# aigid-detector\n\nA tiny test model.\n"


def _register(store, threshold: float, balanced_accuracy: float = 0.8, caption: str = "x"):
    """`aigid register` of the tiny model at ``threshold`` (a new version per threshold) with a report scoring
    it ``balanced_accuracy`` on a one-row test split whose caption is ``caption``."""
    (store / "report.json").write_text(json.dumps(_report(threshold, balanced_accuracy)))
    DatasetDict(
        test=Dataset.from_dict({"Image": [{"bytes": _png(), "path": None}], "Caption": [caption]})
    ).save_to_disk(str(store / "prepared"))
    args = [
        "register",
        "--model",
        str(store / "model"),
        "--report",
        str(store / "report.json"),
        "--data",
        str(store / "prepared"),
        "--portable",
        str(store / "portable"),
        "--card",
        str(store / "model_card.md"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------ prepare and its input layouts


def save_image(path, seed: int, mode: str = "RGB", size=(24, 24), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format=fmt or ("JPEG" if path.suffix == ".jpg" else "PNG"))


def run(tmp_path, source, **prepare):
    """`aigid prepare` of ``source`` in tmp_path (its raw data folder): the committed params.yaml with ``prepare``
    merged into its prepare group, written there first. Returns the result and the output folder."""
    params = yaml.safe_load(open("params.yaml"))
    params["prepare"].update(source=str(source), **prepare)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return invoke_prepare(tmp_path), tmp_path / "prepared"


def invoke_prepare(tmp_path, raw=None):
    """`aigid prepare` with the params file tmp_path/params.yaml as it is and the raw data folder ``raw`` (tmp_path
    by default); it writes ``prepared``, prepare.json and quarantine.csv in tmp_path. Returns click's result."""
    args = ["prepare", "--params", str(tmp_path / "params.yaml"), "--raw", str(raw or tmp_path)]
    args += ["--out", str(tmp_path / "prepared"), "--report", str(tmp_path / "prepare.json")]
    return CliRunner().invoke(main, [*args, "--quarantine", str(tmp_path / "quarantine.csv")])


SOURCE_DIRS = ("coco_image", "sd21_image", "sdxl_image", "sd3_image", "dalle_image", "midjourney_image")


def competition(root, table: str = "xlsx", n: int = 8):
    """train/: captions table + six source folders; validation/: captions + labels tables + images/."""
    captions = pd.DataFrame({"Index": range(n), "Caption": [f"scene {i}: a dog on a sofa" for i in range(n)]})
    (root / "train").mkdir(parents=True)
    if table == "xlsx":
        captions.to_excel(root / "train" / "captions.xlsx", index=False)
    else:
        captions.to_csv(root / "train" / "captions.csv", index=False)
    for k, folder in enumerate(SOURCE_DIRS):  # the competition's folder names, in Label_B order
        for i in range(n):
            save_image(root / "train" / folder / f"image_{i}.jpg", 100 * k + i)
    val = pd.DataFrame({"Index": [0, 1, 2, 3], "Caption": ["a cat", "a car", "two birds", "a bus"]})
    (root / "validation" / "images").mkdir(parents=True)
    val.to_csv(root / "validation" / "captions.csv", index=False)
    pd.DataFrame({"Index": [0, 1, 2, 3], "Label_A": [0, 1, 1, 1], "Label_B": [0, 3, 5, 1]}).to_excel(
        root / "validation" / "labels.xlsx", index=False
    )
    for i in range(4):
        save_image(root / "validation" / "images" / f"image_{i}.jpg", 900 + i)


# ----------------------------------------------------------------------------------------- the collator


class _Recorder:
    """Stands in for the tokenizer and the image processor; keeps what the collator hands them."""

    size = {"shortest_edge": 4}  # the image processor's setting the collator decodes images to

    def __init__(self):
        self.captions, self.images = [], []

    def __call__(self, texts=None, images=None, **_):
        if images is not None:
            self.images += images
            return {"pixel_values": torch.zeros(len(images), 3, 4, 4)}
        self.captions += texts
        return {"input_ids": torch.zeros(len(texts), 2, dtype=torch.long)}
