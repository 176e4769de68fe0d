"""The pieces of the evaluate stage and of training that are checked in isolation: the operating-point
threshold, the robustness perturbations, caption dropout, 16-bit images, the new params."""

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.core.config import ParamsError, load_params
from aigid.core.data import Collator, to_rgb
from aigid.stages.evaluate import Perturbation, perturbations
from aigid.tracking.metrics import ranking_scores, rates_at, threshold_at_fpr
from helpers import _Recorder, write


def test_threshold_at_fpr_is_the_lowest_with_at_most_the_target_rate():
    rng = np.random.default_rng(0)
    real = rng.random(200).astype(np.float32)
    t = threshold_at_fpr(real, 0.05)
    assert (real >= t).mean() <= 0.05  # at most 10 of 200 false positives
    assert (real >= np.sort(real)[::-1][10]).mean() > 0.05  # any lower score as threshold would exceed it
    assert (real >= t).sum() == 10


def test_threshold_at_fpr_with_ties_never_exceeds_the_target():
    real = np.array([0.9] * 5 + [0.1] * 15, dtype=np.float32)  # 5 of 20 tied at the top: 25%
    t = threshold_at_fpr(real, 0.1)
    assert (real >= t).mean() == 0.0 and t > 0.9
    # Compared in float32, as the model's probabilities are, the step above 0.9 survives.
    assert not (torch.tensor(real) >= t).any()


def test_rates_and_ranking_scores():
    labels, prob = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.4])
    assert rates_at(labels, prob, 0.5) == {"tpr": 0.5, "fpr": 0.5}
    assert ranking_scores(labels, prob)["roc_auc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both real and AI"):
        ranking_scores([1, 1], [0.2, 0.3])


def test_perturbations_change_the_image_as_named(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    pixels = np.asarray(img, dtype=float)
    jpeg = Perturbation("jpeg", 50)(img)
    assert jpeg.size == img.size and jpeg.mode == "RGB" and np.abs(np.asarray(jpeg) - pixels).mean() > 1
    blurred = np.asarray(Perturbation("blur", 2)(img), dtype=float)
    assert blurred.std() < pixels.std() / 2  # noise is smoothed away
    assert Perturbation("resize", 0.5)(img).size == (30, 20) and Perturbation("resize", 1.5)(img).size == (90, 60)
    names = [p.name for p in perturbations(load_params(write(tmp_path)).evaluate)]
    assert names == ["jpeg_95", "jpeg_75", "jpeg_50", "blur_1", "blur_2", "resize_50", "resize_150"]


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


def test_caption_dropout_rate_and_determinism():
    rows = _rows(4000)
    torch.manual_seed(1)
    first = _collate(rows, caption_dropout=0.1).captions
    torch.manual_seed(1)
    again = _collate(rows, caption_dropout=0.1).captions
    assert first == again
    assert 0.08 < first.count("") / len(rows) < 0.12
    assert all(c in ("", f"caption {i}") for i, c in enumerate(first))
    assert _collate(rows[:50]).captions == [r["Caption"] for r in rows[:50]]  # off by default (evaluation)


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


@pytest.mark.parametrize(
    "over, key",
    [
        ({"train": {"caption_dropout": 1}}, "train.caption_dropout"),
        ({"train": {"holdout": "real"}}, "train.holdout"),
        ({"train": {"holdout": "flux"}}, "train.holdout"),
        ({"evaluate": {"target_fpr": 0}}, "evaluate.target_fpr"),
        ({"evaluate": {"jpeg_quality": [95, 101]}}, r"jpeg_quality\[1\]"),
        ({"evaluate": {"blur_sigma": [1, "x"]}}, r"evaluate.blur_sigma\[1\]"),
        ({"evaluate": {"resize_scale": 0.5}}, "evaluate.resize_scale"),
    ],
)
def test_new_params_are_checked(tmp_path, over, key):
    with pytest.raises(ParamsError, match=key):
        load_params(write(tmp_path, over))


def test_holdout_accepts_a_generator(tmp_path):
    p = load_params(write(tmp_path, {"train": {"holdout": "sd3"}, "evaluate": {"blur_sigma": [1, 2.5]}}))
    assert p.train.holdout == "sd3" and p.evaluate.blur_sigma == [1.0, 2.5]


def test_only_the_training_loader_drops_captions_and_holdout_drops_its_class(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from aigid.stages.train import DetectorTrainer, drop_class
    from helpers import _tiny_detector

    ds = Dataset.from_dict({"Caption": ["a", "b", "c"], "Label_A": [0, 1, 1], "Label_B": [0, 3, 1]})
    evaluation, training = _Recorder(), _Recorder()
    trainer = DetectorTrainer(
        model=_tiny_detector(),
        train_dataset=ds,
        eval_dataset=ds,
        data_collator=evaluation,
        train_collator=training,
        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], remove_unused_columns=False),
    )
    assert trainer.get_train_dataloader().collate_fn is training
    assert trainer.get_eval_dataloader().collate_fn is evaluation and trainer.data_collator is evaluation
    names = ("real", "sd21", "sdxl", "sd3")
    assert drop_class(ds, names, "sd3")["Caption"] == ["a", "c"]
    with pytest.raises(ValueError, match="train.holdout='flux'"):
        drop_class(ds, names, "flux")


def test_format_control_reports_task_a_per_original_format():
    import io

    from datasets import Dataset

    from aigid.detector.model import decide
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
