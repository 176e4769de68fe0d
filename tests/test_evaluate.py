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
