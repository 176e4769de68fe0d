"""Frozen-encoder mode: features cached once, the heads trained on them, a complete detector saved."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_params_dict
from test_faults import aigid, environment, finish

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("frozen")
    params = tiny_params_dict()
    params["train"]["freeze_encoders"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "encoders", "features", "train", "pseudolabel", "retrain"):
        finish(aigid(stage, cwd=root))
    return root


def test_features_match_the_encoders_and_the_trained_model_keeps_them(frozen):
    from aigid.data import open_dataset
    from aigid.features import open_features
    from aigid.infer import encode_features
    from aigid.model import load_detector

    feats = open_features(frozen / "data/features")
    prepared = open_dataset(frozen / "data/prepared")
    assert set(feats) == set(prepared)
    assert all(len(feats[s]) == len(prepared[s]) for s in feats)
    model, tokenizer, processor = load_detector(frozen / "models/base")
    test = prepared["test"]
    text, image = encode_features(model, tokenizer, processor, test, 16)   # the saved model's encoders
    assert np.allclose(text, feats["test"]["text_features"], atol=1e-4)   # are the starting ones, unchanged
    assert np.allclose(image, feats["test"]["image_features"], atol=1e-4)
    assert list(feats["test"]["Label_B"]) == list(test["Label_B"])


def test_heads_learn_on_cached_features_and_pseudo_rows_point_into_the_pool(frozen):
    from aigid.data import open_dataset

    metrics = json.loads((frozen / "metrics/train.json").read_text())
    assert metrics["train_rows"] == len(open_dataset(frozen / "data/prepared")["train"])
    pseudo = open_dataset(frozen / "data/pseudolabel")
    pool = open_dataset(frozen / "data/prepared")["unlabeled"]
    rows = pseudo["train"]["pool_row"]
    assert [pool[i]["Caption"] for i in rows] == pseudo["train"]["Caption"]
    retrain = json.loads((frozen / "metrics/retrain.json").read_text())
    assert retrain["train_rows"] == metrics["train_rows"] + len(pseudo["train"])


def test_full_fine_tuning_leaves_features_uncomputed_and_frozen_mode_refuses_them(frozen, tmp_path):
    params = tiny_params_dict()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    finish(aigid("features", "--data", str(frozen / "data/prepared"), "--encoders", str(frozen / "models/encoders"),
                 "--out", str(tmp_path / "features"), cwd=tmp_path))
    assert json.loads((tmp_path / "features/features.json").read_text())["computed"] is False
    proc = subprocess.run(["aigid", "train", "--data", str(frozen / "data/prepared"), "--encoders",
                           str(frozen / "models/encoders"), "--features", str(tmp_path / "features"),
                           "--out", str(tmp_path / "m"), "--params", str(frozen / "params.yaml")],
                          cwd=tmp_path, env=environment(), capture_output=True, text=True)
    assert proc.returncode != 0 and "no cached features" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_frozen_model_predicts_the_same_from_images_and_from_features(frozen):
    from aigid.data import open_dataset
    from aigid.features import open_features, predict_from_features
    from aigid.infer import predict_logits
    from aigid.model import load_detector

    model, tokenizer, processor = load_detector(frozen / "models/retrained")
    test = open_dataset(frozen / "data/prepared")["test"]
    a1, b1 = predict_logits(model, tokenizer, processor, test, 8)
    a2, b2 = predict_from_features(model, open_features(frozen / "data/features")["test"])
    assert torch.allclose(torch.from_numpy(a1), torch.from_numpy(a2), atol=1e-4)
    assert torch.allclose(torch.from_numpy(b1), torch.from_numpy(b2), atol=1e-4)
