"""configs/paper.yaml, end to end and offline: the README's command (`cp configs/paper.yaml params.yaml &&
dvc repro`) with the hub ids swapped for local stand-ins of the same architectures (BERT-base and CLIP
ViT-B/32 configs, random weights) and a tiny parquet dataset in the Defactify schema, tracked by DVC under
data/raw as the README says. Everything else is the paper's configuration as shipped, but one epoch."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from aigid.core.config import load_params
from helpers import REPO, STAGES, sh
from standins import bert_base, clip_vit_b32, defactify_parquet

pytestmark = pytest.mark.slow


def test_the_paper_configuration_runs_every_stage(tmp_path):
    root = tmp_path / "project"
    for name in ("dvc.yaml", ".gitignore", "params.yaml", "configs/paper.yaml", "data/raw/README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for cmd in (
        ("git", "init", "-q"),
        ("git", "config", "user.email", "ci@example.com"),
        ("git", "config", "user.name", "ci"),
        ("dvc", "init", "-q"),
    ):
        sh(*cmd, cwd=root)

    defactify_parquet(root / "data/raw/defactify", {"train": 4, "validation": 2, "test": 2})
    sh("dvc", "add", "data/raw/defactify", cwd=root)
    shutil.copy(root / "configs/paper.yaml", root / "params.yaml")  # the README's command
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["source"] = "data/raw/defactify"
    params["encoders"].update(
        text=str(bert_base(tmp_path / "bert-base-uncased", ["a photo of a dog"])),
        vision=str(clip_vit_b32(tmp_path / "clip-vit-base-patch32")),
    )
    params["train"]["epochs"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(root / "params.yaml")
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "paper configuration with local stand-ins", cwd=root)

    out = sh("dvc", "repro", cwd=root)
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == list(STAGES), out

    prepared = json.loads((root / "reports/prepare.json").read_text())
    assert (prepared["source"], prepared["layout"]) == ("data/raw/defactify", "parquet")
    assert {k: v["rows"] for k, v in prepared["splits"].items()} == {"train": 24, "validation": 12, "test": 12}
    config = json.loads((root / "models/retrained/config.json").read_text())
    assert (
        config["text_encoder_config"]["hidden_size"] == 768 and config["text_encoder_config"]["num_hidden_layers"] == 12
    )
    assert config["vision_encoder_config"]["patch_size"] == 32 and config["vision_encoder_config"]["image_size"] == 224
    assert config["max_text_length"] == 128
    pseudo = json.loads((root / "reports/pseudolabel.json").read_text())
    assert pseudo["pool"] == "test" and pseudo["threshold"] == 0.8
    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluation["contaminated"] is True  # the paper pseudo-labels the test split
    exported = json.loads((root / "reports/export.json").read_text())  # BERT-base + ViT-B/32 as ONNX
    assert exported["rows"] == 12 and exported["graph_max_logit_difference"] < 1e-3
    assert exported["weights_bytes"] > 4 * 190e6  # every float32 weight of both encoders
    assert "Running stage" not in sh("dvc", "repro", cwd=root)
