"""`prepare` on the layouts users bring: competition tables + source folders, class folders, bad files."""

from __future__ import annotations

import csv
import io
import json
import shutil

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from aigid.cli import main
from aigid.core.data import open_dataset
from helpers import competition, run, save_image


@pytest.mark.parametrize("table", ["xlsx", "csv"])
def test_competition_layout_labels_from_folders_and_from_a_labels_table(tmp_path, table):
    competition(tmp_path / "ct2", table)
    result, out = run(tmp_path, tmp_path / "ct2")
    assert result.exit_code == 0, result.output
    dsd = open_dataset(out)
    assert len(dsd["validation"]) == 4 and list(dsd["validation"]["Label_B"]) == [0, 3, 5, 1]
    assert len(dsd["train"]) + len(dsd["test"]) == 48  # test made by caption from train
    assert dsd["train"].features["Label_B"].names == ["real", "sd21", "sdxl", "sd3", "dalle3", "midjourney6"]
    for ds in (dsd["train"], dsd["test"]):
        by_caption = {}
        for caption, label in zip(ds["Caption"], ds["Label_B"]):
            by_caption.setdefault(caption, set()).add(label)
        assert all(labels == set(range(6)) for labels in by_caption.values())  # all six images stay together
    metrics = json.loads((tmp_path / "prepare.json").read_text())
    assert metrics["shared_captions_train_test"] == 0 and metrics["splits_made_by_caption"] == ["test"]


def test_competition_missing_image_names_the_file(tmp_path):
    competition(tmp_path / "ct2")
    (tmp_path / "ct2" / "train" / "sdxl_image" / "image_3.jpg").unlink()
    result, out = run(tmp_path, tmp_path / "ct2")
    assert result.exit_code != 0 and "sdxl_image/image_3.jpg" in result.output and "cannot read" in result.output
    assert not out.exists()


def test_competition_captions_table_missing_column_is_named(tmp_path):
    competition(tmp_path / "ct2", "csv")
    pd.DataFrame({"Index": [0], "Text": ["x"]}).to_csv(tmp_path / "ct2" / "train" / "captions.csv", index=False)
    result, _ = run(tmp_path, tmp_path / "ct2")
    assert result.exit_code != 0 and "captions.csv: missing column(s) Caption" in result.output


def class_folders(root, classes=("real", "sdxl", "flux"), per_class: int = 6):
    for k, name in enumerate(classes):
        for i in range(per_class):
            save_image(root / name / f"{name}_{i}.png", 10 * k + i)
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        w.writerow(["real_0.png", "une tour près du café, 東京"])
        w.writerow(["sdxl/sdxl_1.png", "a lighthouse at dusk"])


def test_class_folders_with_captions_and_a_class_added_in_params(tmp_path):
    class_folders(tmp_path / "mine")
    names = ["real", "sd21", "sdxl", "sd3", "dalle3", "midjourney6", "flux"]
    result, out = run(tmp_path, tmp_path / "mine", class_names=names)
    assert result.exit_code == 0, result.output
    dsd = open_dataset(out)
    assert set(dsd) == {"train", "validation", "test"}
    rows = [r for split in dsd.values() for r in split.select_columns(["Caption", "source_file", "Label_B"])]
    by_file = {r["source_file"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_file["real_0.png"]["Caption"] == "une tour près du café, 東京"
    assert by_file["sdxl_1.png"]["Caption"] == "a lighthouse at dusk"
    assert by_file["flux_2.png"]["Caption"] == "" and by_file["flux_2.png"]["Label_B"] == 6
    assert dsd["train"].features["Label_B"].names == names
    # Images without a caption are their own group: splitting by caption does not lump them together.
    assert len(rows) == 18 and min(len(ds) for ds in dsd.values()) >= 2


def test_unknown_class_folder_is_named(tmp_path):
    class_folders(tmp_path / "mine")
    result, _ = run(tmp_path, tmp_path / "mine")
    assert result.exit_code != 0 and "class folder 'flux' is not a known class" in result.output


def test_caption_path_outside_the_root_is_refused(tmp_path):
    class_folders(tmp_path / "mine", classes=("real", "sdxl"))
    with open(tmp_path / "mine" / "captions.csv", "a", newline="") as f:
        csv.writer(f).writerow(["../../etc/passwd", "nope"])
    result, _ = run(tmp_path, tmp_path / "mine")
    assert result.exit_code != 0 and "points outside the dataset root" in result.output


def _bad_files(root):
    """One of each kind of bad file among good ones, in class folders."""
    for i in range(8):
        save_image(root / "real" / f"ok_{i}.png", i)
        save_image(root / "sdxl" / f"ok_{i}.jpg", 50 + i)
    (root / "real" / "empty.png").write_bytes(b"")
    (root / "real" / "notes.png").write_text("this is not an image")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    (root / "sdxl" / "truncated.jpg").write_bytes(good.getvalue()[:150])
    save_image(root / "sdxl" / "huge.png", 7, size=(300, 300))  # above max_pixels below
    save_image(root / "sdxl" / "alpha.png", 8, mode="RGBA")  # converted, not rejected
    save_image(root / "sdxl" / "gray.png", 9, mode="L")
    save_image(root / "sdxl" / "cmyk.jpg", 10, mode="CMYK")


def test_bad_files_stop_prepare_by_default(tmp_path):
    _bad_files(tmp_path / "mine")
    result, out = run(tmp_path, tmp_path / "mine", max_pixels=250 * 250)
    assert result.exit_code != 0 and "real/empty.png" in result.output and "empty image file" in result.output
    assert not out.exists()


def test_on_bad_skip_quarantines_every_bad_file_with_its_reason(tmp_path):
    _bad_files(tmp_path / "mine")
    result, out = run(tmp_path, tmp_path / "mine", max_pixels=250 * 250, on_bad="skip")
    assert result.exit_code == 0, result.output
    report = list(csv.DictReader(open(tmp_path / "quarantine.csv")))
    skipped = {r["file"].rsplit("/", 1)[-1]: r["reason"] for r in report if r["action"] == "skipped"}
    assert set(skipped) == {"empty.png", "notes.png", "truncated.jpg", "huge.png"}
    assert "empty image file" in skipped["empty.png"]
    assert "cannot decode" in skipped["notes.png"] and "cannot decode" in skipped["truncated.jpg"]
    assert "decompression-bomb guard" in skipped["huge.png"]
    metrics = json.loads((tmp_path / "prepare.json").read_text())
    assert metrics["skipped"]["total"] == 4
    stored = sum(len(ds) for ds in open_dataset(out).values())
    assert stored == 16 + 3  # good ones plus alpha, gray, CMYK


def test_duplicate_images_across_splits_are_reported(tmp_path):
    root = tmp_path / "mine"
    for split in ("train", "test"):
        for i in range(6):
            save_image(root / split / "real" / f"r{i}.png", i)  # same pixels in both splits
            save_image(root / split / "sdxl" / f"s{i}.png", 100 + i + (0 if split == "train" else 50))
    result, _ = run(tmp_path, root)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "prepare.json").read_text())
    across = {k: v for k, v in metrics["duplicates"].items() if k.startswith("across_")}
    assert sum(across.values()) == 6 and "across_train_test" in across  # validation was cut from train
    report = list(csv.DictReader(open(tmp_path / "quarantine.csv")))
    assert sum("duplicate" in r["reason"] for r in report) == 6


def test_split_with_no_samples_is_an_error(tmp_path):
    root = tmp_path / "mine"
    class_folders(root, classes=("real", "sdxl"))
    (root / "test" / "real").mkdir(parents=True)
    for name in ("real", "sdxl"):
        shutil.move(str(root / name), str(root / "train" / name))
    result, _ = run(tmp_path, root)
    assert result.exit_code != 0 and "no images in any class folder" in result.output


def test_large_images_are_stored_resized_to_max_side(tmp_path):
    root = tmp_path / "mine"
    for name in ("real", "sdxl"):
        for i in range(6):
            save_image(root / name / f"{i}.png", i, size=(120, 90))
    result, out = run(tmp_path, root, max_side=30)
    assert result.exit_code == 0, result.output
    image = open_dataset(out)["train"][0]["Image"]
    assert Image.open(io.BytesIO(image["bytes"])).size == (40, 30)


def test_an_unknown_source_folder_is_an_error_not_skipped(tmp_path):
    competition(tmp_path / "ct2")
    save_image(tmp_path / "ct2" / "train" / "flux_image" / "image_0.jpg", 7)
    result, out = run(tmp_path, tmp_path / "ct2")
    assert result.exit_code != 0 and not out.exists()
    assert "flux_image" in result.output and "prepare.class_aliases" in result.output, result.output


def test_a_local_source_outside_the_raw_data_folder_is_refused(tmp_path):
    competition(tmp_path / "elsewhere" / "ct2")
    (tmp_path / "raw").mkdir()
    params = yaml.safe_load(open("params.yaml"))
    params["prepare"]["source"] = str(tmp_path / "elsewhere" / "ct2")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(
        main,
        [
            "prepare",
            "--params",
            str(tmp_path / "params.yaml"),
            "--raw",
            str(tmp_path / "raw"),
            "--out",
            str(tmp_path / "prepared"),
            "--report",
            str(tmp_path / "prepare.json"),
        ],
    )
    assert result.exit_code != 0 and not (tmp_path / "prepared").exists()
    assert f"must be inside {tmp_path / 'raw'}/" in result.output and "dvc add" in result.output
