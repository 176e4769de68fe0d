"""Frozen-encoder mode: features cached once, the heads trained on them, a complete detector saved."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import aigid, environment, finish, tiny_params_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("frozen")
    params = tiny_params_dict()
    params["train"]["freeze_encoders"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw").mkdir(parents=True)  # the raw data folder prepare depends on
    for stage in ("prepare", "encoders", "features", "train", "pseudolabel", "retrain"):
        finish(aigid(stage, cwd=root))
    return root


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


def test_frozen_model_predicts_the_same_from_images_and_from_features(frozen):
    from aigid.core.data import open_dataset
    from aigid.detector.cache import open_features, predict_from_features
    from aigid.detector.infer import RunOptions, predict_logits
    from aigid.detector.model import load_detector

    detector = load_detector(frozen / "models/retrained")
    model = detector.model
    test = open_dataset(frozen / "data/prepared")["test"]
    a1, b1 = predict_logits(detector, test, RunOptions(batch_size=8))
    a2, b2 = predict_from_features(model, open_features(frozen / "data/features")["test"])
    assert torch.allclose(torch.from_numpy(a1), torch.from_numpy(a2), atol=1e-4)
    assert torch.allclose(torch.from_numpy(b1), torch.from_numpy(b2), atol=1e-4)


def test_batches_of_cached_features_are_the_rows_pseudo_labelled_ones_included(frozen):
    from aigid.core.config import load_params
    from aigid.core.data import open_dataset
    from aigid.detector.cache import FeatureCollator, FeatureRows, open_features
    from aigid.stages.train import _feature_splits

    params = load_params(frozen / "params.yaml")
    train, _ = _feature_splits(params, frozen / "data/features", frozen / "data/pseudolabel")
    pseudo = open_dataset(frozen / "data/pseudolabel")["train"]
    pool = open_features(frozen / "data/features")[params.pseudolabel.pool]
    assert len(pseudo) > 0
    rows = FeatureRows(train)
    indices = [len(train) - 1, 0, 5, len(train) - len(pseudo)]  # pseudo-labelled rows come last
    batch = FeatureCollator()(rows.__getitems__(indices))
    assert batch["text_features"].dtype == torch.float32 and batch["labels_a"].dtype == torch.int64
    listed = FeatureCollator()(train.with_format("numpy").__getitems__(indices))  # rows of a plain dataset
    assert all(torch.equal(batch[k], listed[k]) for k in batch)
    for k, i in enumerate(indices):
        row = train.with_format("numpy")[i]
        assert np.array_equal(batch["text_features"][k].numpy(), row["text_features"])
        assert np.array_equal(batch["image_features"][k].numpy(), row["image_features"])
        assert (batch["labels_a"][k], batch["labels_b"][k]) == (row["Label_A"], row["Label_B"])
    last = pseudo[len(pseudo) - 1]
    assert np.array_equal(batch["image_features"][0].numpy(), np.asarray(pool[last["pool_row"]]["image_features"]))
    assert (batch["labels_a"][0], batch["labels_b"][0]) == (last["Label_A"], last["Label_B"])


def test_frozen_training_killed_after_a_checkpoint_resumes_to_the_same_model(frozen, tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file
    from transformers import Trainer

    from aigid.core.config import load_params, scoped
    from aigid.stages import train
    from aigid.stages.train import CHECKPOINT_FILES, fit

    class Killed(Exception):
        pass

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise Killed

    monkeypatch.chdir(tmp_path)  # the MLflow store of these runs
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    params = scoped(load_params(frozen / "params.yaml"), train.PARAMS)

    def run(out: str, checkpoints: str):
        paths = train.Paths(
            data=frozen / "data/prepared",
            encoders=frozen / "models/encoders",
            features=frozen / "data/features",
            out=tmp_path / out,
        )
        return fit(params, paths, checkpoint_dir=tmp_path / checkpoints)

    save = Trainer._save_checkpoint
    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run("killed", "ck")
    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    (checkpoint,) = (tmp_path / "ck").glob("*/checkpoint-*")
    assert all((checkpoint / name).is_file() for name in CHECKPOINT_FILES)
    assert {k.split(".")[0] for k in load_file(checkpoint / "model.safetensors")} == {"fusion", "head_a", "head_b"}

    steps = []
    step = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **kw: steps.append(1) or step(self, *a, **kw))
    with caplog.at_level("INFO", logger="aigid.stages.train"):
        resumed = run("killed", "ck")
    assert "resuming train from the last checkpoint" in caplog.text
    resumed_steps, steps[:] = len(steps), []
    unbroken = run("unbroken", "ck2")
    assert resumed_steps == len(steps) * (params.train.epochs - 1) / params.train.epochs  # only the epochs left
    assert resumed["metrics"] == pytest.approx(unbroken["metrics"])
    assert len(resumed["history"]) == params.train.epochs
    for epoch_resumed, epoch_unbroken in zip(resumed["history"], unbroken["history"]):
        assert epoch_resumed == pytest.approx(epoch_unbroken)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("killed", "unbroken"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)  # the complete detector


def test_class_balanced_pseudo_labels_have_the_train_mix(frozen, tmp_path):
    params = yaml.safe_load((frozen / "params.yaml").read_text())
    params["pseudolabel"]["selection"] = "class_balanced"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    finish(
        aigid(
            "pseudolabel",
            "--model",
            str(frozen / "models/base"),
            "--data",
            str(frozen / "data/prepared"),
            "--features",
            str(frozen / "data/features"),
            "--out",
            str(tmp_path / "pseudo"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--report",
            str(tmp_path / "r.json"),
            cwd=tmp_path,
        )
    )
    report = json.loads((tmp_path / "r.json").read_text())
    default = json.loads((frozen / "reports/pseudolabel.json").read_text())
    assert report["selection"] == "class_balanced" and default["selection"] == "threshold"
    assert report["passed_threshold"] == default["kept"] >= report["kept"]
    per_class = report["per_class"].values()
    assert [c["kept"] for c in per_class] == [c["quota"] for c in per_class]
    assert len({c["quota"] for c in per_class}) == 1  # the tiny train split has one image per source
    assert min(c["passed_threshold"] for c in per_class) == next(iter(per_class))["quota"]
    assert report["kept"] == report["train_rows"] + report["validation_rows"] == sum(c["kept"] for c in per_class)


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
