"""Frozen-encoder mode: features cached once, the heads trained on them, a complete detector saved. The tiny
pipeline run frozen is the ``frozen`` fixture (conftest.py), shared with test_cache, test_train and test_pseudolabel."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import yaml

from helpers import aigid, environment, finish, tiny_params_dict

pytestmark = pytest.mark.slow


def test_features_match_the_encoders_and_the_trained_model_keeps_them(frozen):
    from aigid.core.data import open_dataset
    from aigid.detector.cache import open_features
    from aigid.detector.infer import RunOptions, encode_features
    from aigid.detector.model import load_detector

    feats = open_features(frozen / "data/features")
    prepared = open_dataset(frozen / "data/prepared")
    assert set(feats) == set(prepared)
    assert all(len(feats[s]) == len(prepared[s]) for s in feats)
    detector = load_detector(frozen / "models/base")
    test = prepared["test"]
    text, image = encode_features(detector, test, RunOptions(batch_size=16))  # the saved model's encoders
    assert np.allclose(text, feats["test"]["text_features"], atol=1e-4)  # are the starting ones, unchanged
    assert np.allclose(image, feats["test"]["image_features"], atol=1e-4)
    assert list(feats["test"]["Label_B"]) == list(test["Label_B"])


def test_heads_learn_on_cached_features_and_pseudo_rows_point_into_the_pool(frozen):
    from aigid.core.data import open_dataset

    metrics = json.loads((frozen / "reports/train.json").read_text())
    assert metrics["train_rows"] == len(open_dataset(frozen / "data/prepared")["train"])
    pseudo = open_dataset(frozen / "data/pseudolabel")
    pool = open_dataset(frozen / "data/prepared")["unlabeled"]
    rows = pseudo["train"]["pool_row"]
    assert [pool[i]["Caption"] for i in rows] == pseudo["train"]["Caption"]
    retrain = json.loads((frozen / "reports/retrain.json").read_text())
    assert retrain["train_rows"] == metrics["train_rows"] + len(pseudo["train"])


def test_full_fine_tuning_leaves_features_uncomputed_and_frozen_mode_refuses_them(frozen, tmp_path):
    params = tiny_params_dict()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    finish(
        aigid(
            "features",
            "--data",
            str(frozen / "data/prepared"),
            "--encoders",
            str(frozen / "models/encoders"),
            "--out",
            str(tmp_path / "features"),
            cwd=tmp_path,
        )
    )
    assert json.loads((tmp_path / "features/features.json").read_text())["computed"] is False
    proc = subprocess.run(
        [
            "aigid",
            "train",
            "--data",
            str(frozen / "data/prepared"),
            "--encoders",
            str(frozen / "models/encoders"),
            "--features",
            str(tmp_path / "features"),
            "--out",
            str(tmp_path / "m"),
            "--params",
            str(frozen / "params.yaml"),
        ],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "no cached features" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_cross_attention_trains_on_cached_token_features(frozen, tmp_path):
    """With a fusion that reads every token, the features stage caches each caption's token features (padding
    dropped); the heads train on them, pseudolabel reads them, and a cache of [CLS] features is refused."""
    from aigid.core.data import open_dataset
    from aigid.detector.cache import open_features, predict_from_features
    from aigid.detector.infer import RunOptions, encode_features, predict_logits
    from aigid.detector.model import load_detector

    params = yaml.safe_load((frozen / "params.yaml").read_text())
    params["model"]["fusion"] = "cross_attention"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shared = ["--data", str(frozen / "data/prepared"), "--encoders", str(frozen / "models/encoders")]
    proc = subprocess.run(
        ["aigid", "train", *shared, "--features", str(frozen / "data/features"), "--out", str(tmp_path / "m")],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "not what model.fusion: cross_attention reads" in proc.stderr
    assert "Traceback" not in proc.stderr
    finish(aigid("features", *shared, "--out", str(tmp_path / "features"), cwd=tmp_path))
    finish(
        aigid(
            "train",
            *shared,
            "--features",
            str(tmp_path / "features"),
            "--out",
            str(tmp_path / "base"),
            "--metrics",
            "m.json",
            "--report",
            "r.json",
            "--history",
            "h.json",
            cwd=tmp_path,
        )
    )

    feats = open_features(tmp_path / "features", "cross_attention")["test"]
    test = open_dataset(frozen / "data/prepared")["test"]
    detector = load_detector(tmp_path / "base")
    assert detector.model.config.fusion == "cross_attention"
    tokens, _ = encode_features(detector, test, RunOptions(batch_size=16), tokens=True)  # the starting encoders
    cached = feats["text_features"]
    assert [len(t) for t in cached] == [len(t) for t in tokens] and len({len(t) for t in tokens}) > 1
    assert all(np.allclose(np.stack(c), t, atol=1e-4) for c, t in zip(cached, tokens))
    a1, b1 = predict_logits(detector, test, RunOptions(batch_size=8))
    a2, b2 = predict_from_features(detector.model, feats)
    assert np.allclose(a1, a2, atol=1e-4) and np.allclose(b1, b2, atol=1e-4)
    finish(
        aigid(
            "pseudolabel",
            "--model",
            str(tmp_path / "base"),
            "--data",
            str(frozen / "data/prepared"),
            "--features",
            str(tmp_path / "features"),
            "--out",
            str(tmp_path / "pseudo"),
            "--metrics",
            "p.json",
            "--report",
            "pr.json",
            cwd=tmp_path,
        )
    )
    assert json.loads((tmp_path / "pr.json").read_text())["pool_rows"] == len(
        open_dataset(frozen / "data/prepared")["unlabeled"]
    )
