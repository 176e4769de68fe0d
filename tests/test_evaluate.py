"""The pieces of the `evaluate` stage (aigid.stages.evaluate) checked in isolation: the robustness perturbations
and the format control."""

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.core.config import ParamsError, load_params
from aigid.stages.evaluate import Perturbation, perturbations
from helpers import REPO, write


def test_perturbations_change_the_image_as_named(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    pixels = np.asarray(img, dtype=float)
    jpeg = Perturbation("jpeg", 50)(img)
    assert jpeg.size == img.size and jpeg.mode == "RGB" and np.abs(np.asarray(jpeg) - pixels).mean() > 1
    blurred = np.asarray(Perturbation("blur", 2)(img), dtype=float)
    assert blurred.std() < pixels.std() / 2  # noise is smoothed away
    assert Perturbation("resize", 0.5)(img).size == (30, 20) and Perturbation("resize", 1.5)(img).size == (90, 60)
    names = [p.name for p in perturbations(load_params(REPO / "params.yaml").evaluate)]  # in params order
    assert names == ["jpeg_95", "jpeg_75", "jpeg_50", "blur_1", "blur_2", "resize_50", "resize_150"]


@pytest.mark.parametrize(
    "grid, message",
    [
        (
            {"jpeg": [95, 101]},
            r"evaluate\.robustness\.jpeg\[1\]: must be an integer from 1 to 100 \(the JPEG quality\), got 101",
        ),
        ({"jpeg": [92.5]}, r"evaluate\.robustness\.jpeg\[0\]: must be an integer"),
        ({"blur": [0]}, r"evaluate\.robustness\.blur\[0\]: must be a positive number"),
        ({"blurr": [1]}, r"evaluate\.robustness: 'blurr' is not one of jpeg, blur, resize \(did you mean 'blur'\?\)"),
    ],
)
def test_the_robustness_grid_takes_the_kinds_and_values_of_the_perturbation_table(tmp_path, grid, message):
    params = load_params(write(tmp_path, {"evaluate": {"robustness": grid}}))  # the table checks, not the schema
    with pytest.raises(ParamsError, match=message):
        perturbations(params.evaluate)


def test_format_control_reports_task_a_per_original_format():
    import io

    from datasets import Dataset

    from aigid.detector.scores import decide
    from aigid.stages.evaluate import format_control

    def encoded(fmt):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format=fmt)
        return {"bytes": buf.getvalue(), "path": None}

    # A "JPEG = real" detector: real JPEGs and AI PNGs are right; once all are JPEG, every image is called real.
    formats = ["JPEG", "JPEG", "PNG", "PNG", "GIF"]
    labels_a = [0, 1, 0, 1, 1]
    test = Dataset.from_dict({"Image": [encoded(f) for f in formats], "Label_A": labels_a, "Label_B": [0, 2, 0, 1, 1]})
    logits_b = torch.zeros(5, 3)
    clean = decide(torch.tensor([-5.0, -5.0, 5.0, 5.0, 5.0]), logits_b)
    controlled = decide(torch.full((5,), -5.0), logits_b)
    out = format_control(test, clean, controlled, 90, ("real", "sd21", "sdxl"))
    assert out["jpeg_quality"] == 90
    assert out["by_original_format"] == {
        "JPEG": {
            "real": {"n": 1, "clean_recall": 1.0, "controlled_recall": 1.0},
            "ai": {"n": 1, "clean_recall": 0.0, "controlled_recall": 0.0},
        },
        "PNG": {
            "real": {"n": 1, "clean_recall": 0.0, "controlled_recall": 1.0},
            "ai": {"n": 1, "clean_recall": 1.0, "controlled_recall": 0.0},
        },
        "other": {"ai": {"n": 1, "clean_recall": 1.0, "controlled_recall": 0.0}},
    }
    assert out["task_a"]["balanced_accuracy"] == 0.5 and out["task_a"]["f1_binary"] == 0.0
    assert out["per_class"] == {"real": 1.0, "sd21": 0.0, "sdxl": 0.0}


def _rows(n: int = 14):
    """A small test split: images of a few sizes, captions shared by two images each (one blank)."""
    import io

    from datasets import Dataset

    rng = np.random.default_rng(1)
    images = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    return Dataset.from_dict(
        {
            "Image": images,
            "Caption": [["a red circle", "two", "", "red two circle"][(i // 2) % 4] for i in range(n)],
            "caption_id": [i // 2 for i in range(n)][::-1],  # visited in another order than stored
            "Label_A": [int(i % 3 != 0) for i in range(n)],
            "Label_B": [0 if i % 3 == 0 else 1 + i % 5 for i in range(n)],
        }
    )


def _pair(tmp_path):
    """Two tiny detectors with the same encoders and different heads (frozen-encoder train and retrain)."""
    from aigid.detector.model import load_detector, save_detector
    from helpers import save_tiny_model

    save_tiny_model(tmp_path / "base")
    other = load_detector(tmp_path / "base", "fp32")
    torch.manual_seed(1)
    for module in (other.model.fusion, other.model.head_a, other.model.head_b):
        for p in module.parameters():
            p.data.normal_()
    save_detector(other.model, other.tokenizer, other.processor, tmp_path / "retrained")
    (tmp_path / "retrained/scoring.json").write_bytes((tmp_path / "base/scoring.json").read_bytes())
    return {name: load_detector(tmp_path / name, "fp32") for name in ("base", "retrained")}


def test_scoring_the_grid_once_for_models_sharing_encoders_gives_each_pass_s_numbers(tmp_path):
    from aigid.detector.cache import Condition, predict_grid, shares_encoders
    from aigid.detector.infer import RunOptions, predict_logits

    detectors, rows = _pair(tmp_path), _rows()
    assert shares_encoders(detectors["base"], detectors["retrained"])
    grid = [
        Condition("clean"),
        Condition("blank", blank=True),
        Condition("jpeg_50", Perturbation("jpeg", 50)),
        Condition("blur_1", Perturbation("blur", 1)),
    ]
    options = RunOptions(batch_size=4)  # several batches, a caption's images in one
    shared = predict_grid(detectors, rows, grid, options)
    # The first one's tokenizer encoded every batch (and so carries a call's truncation): still the same pair,
    # as evaluate asks again for the validation rows.
    assert shares_encoders(detectors["base"], detectors["retrained"])
    for name, detector in detectors.items():
        alone = predict_grid({name: detector}, rows, grid, options)
        for condition in grid:
            ds = rows.remove_columns("Caption").add_column("Caption", [""] * len(rows)) if condition.blank else rows
            one_pass = predict_logits(detector, ds, RunOptions(batch_size=4, perturb=condition.perturb))
            for got in (shared[condition.name][name], alone[condition.name][name]):
                assert all(np.array_equal(a, b) for a, b in zip(got, one_pass)), (name, condition.name)
    assert not np.array_equal(shared["clean"]["base"][0], shared["clean"]["retrained"][0])  # other heads
    assert not np.array_equal(shared["clean"]["base"][0], shared["jpeg_50"]["base"][0])


def test_models_with_other_encoder_weights_are_scored_apart(tmp_path):
    from aigid.detector.cache import Condition, predict_grid, shares_encoders
    from aigid.detector.infer import RunOptions
    from aigid.stages.evaluate import encoder_groups

    detectors = _pair(tmp_path)
    assert encoder_groups(detectors) == [["base", "retrained"]]
    with torch.no_grad():  # one weight of the vision encoder moved: a fine-tuned model
        next(detectors["retrained"].model.vision_encoder.parameters()).view(-1)[0] += 1e-3
    assert not shares_encoders(detectors["base"], detectors["retrained"])
    assert encoder_groups(detectors) == [["base"], ["retrained"]]
    with pytest.raises(ValueError, match="do not share their encoders"):
        predict_grid(detectors, _rows(), [Condition("clean")], RunOptions())


def test_weighted_f1_is_scikit_learn_s():
    from sklearn.metrics import f1_score

    from aigid.tracking.metrics import weighted_f1

    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 4, 50), rng.integers(0, 5, 50)
    pred[pred == 4] = 0
    expected = f1_score(true, pred, labels=[0, 1, 2, 3, 4], average="weighted", zero_division=0)
    assert weighted_f1(true, pred, 5) == pytest.approx(expected, abs=1e-12)
    weights = rng.integers(0, 3, 50).astype(float)  # a resample's counts: a row taken 0, 1 or 2 times
    taken = np.repeat(np.arange(50), weights.astype(int))
    assert weighted_f1(true, pred, 5, weights) == pytest.approx(
        f1_score(true[taken], pred[taken], labels=[0, 1, 2, 3, 4], average="weighted", zero_division=0), abs=1e-12
    )


def test_the_retrained_minus_base_interval_says_which_model_is_better():
    from aigid.serving.card import _against_base
    from aigid.tracking.metrics import paired_bootstrap

    rng = np.random.default_rng(3)
    labels_a = np.array([0, 1] * 30)
    labels_b = np.where(labels_a == 1, 1 + np.arange(60) % 3, 0)
    good = (np.where(labels_a == 1, 0.9, 0.1), labels_a, labels_b)  # every row right
    wrong = rng.random(60) < 0.4  # 40% of the rows wrong on both tasks
    worse_a = np.where(wrong, 1 - labels_a, labels_a)
    worse = (np.where(worse_a == 1, 0.8, 0.2), worse_a, np.where(worse_a == 1, np.where(wrong, 2, labels_b), 0))
    hurt = paired_bootstrap(labels_a, labels_b, good, worse, 4, rounds=200)
    assert hurt["rounds"] == 200 and hurt["seed"] == 0 and hurt["confidence"] == 0.95
    for metric, m in hurt["metrics"].items():
        assert m["base"] == pytest.approx(1.0) and m["retrained"] < 0.9, metric
        assert m["ci_low"] <= m["difference"] <= m["ci_high"] < 0, metric  # retraining hurt
    helped = paired_bootstrap(labels_a, labels_b, worse, good, 4, rounds=200)
    assert all(m["ci_high"] >= m["ci_low"] > 0 for m in helped["metrics"].values())
    same = paired_bootstrap(labels_a, labels_b, worse, worse, 4, rounds=200)
    assert all(m["difference"] == m["ci_low"] == m["ci_high"] == 0 for m in same["metrics"].values())
    assert paired_bootstrap(labels_a, labels_b, good, worse, 4, rounds=200) == hurt  # seeded
    card = "\n".join(_against_base(hurt))
    row = hurt["metrics"]["task_a_f1_weighted"]
    assert "## Retrained against base (test split)" in card
    assert f"| task_a_f1_weighted | 1.0000 | {row['retrained']:.4f} | {row['difference']:.4f} |" in card
