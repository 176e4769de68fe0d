"""The readers of the layouts users bring (aigid.sources.readers), through `aigid prepare`: competition tables +
source folders, class folders, and where a local source may lie."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from aigid.core.data import open_dataset
from helpers import competition, invoke_prepare, run, save_image


def test_a_layout_not_in_the_table_is_one_line_naming_the_key(tmp_path):
    (tmp_path / "data").mkdir()
    result, out = run(tmp_path, tmp_path / "data", layout="parket")
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().splitlines()[-1] == (
        "Error: prepare.layout: 'parket' is not one of auto, hub, arrow, parquet, competition, folders "
        "(did you mean 'parquet'?)"
    )


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


def test_split_with_no_samples_is_an_error(tmp_path):
    root = tmp_path / "mine"
    class_folders(root, classes=("real", "sdxl"))
    (root / "test" / "real").mkdir(parents=True)
    for name in ("real", "sdxl"):
        shutil.move(str(root / name), str(root / "train" / name))
    result, _ = run(tmp_path, root)
    assert result.exit_code != 0 and "no images in any class folder" in result.output


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
    result = invoke_prepare(tmp_path, raw=tmp_path / "raw")
    assert result.exit_code != 0 and not (tmp_path / "prepared").exists()
    assert f"must be inside {tmp_path / 'raw'}/" in result.output and "dvc add" in result.output


HUB_FEATURES = Features(
    {"Image": Image(), "Caption": Value("string"), "Label_A": Value("int64"), "Label_B": Value("int64")}
)
HUB_SPLITS = ("train", "validation", "test")


def hub_card(configs: dict[str, str], default: str | None) -> str:
    """README.md as `push_to_hub` writes it: a YAML header with the features and ``configs`` (config name ->
    its folder; ``default: true`` on ``default``), then the card's text."""
    features = [{"name": c, "dtype": "image" if c == "Image" else f.dtype} for c, f in HUB_FEATURES.items()]
    entries = []
    for name, folder in configs.items():
        entries.append({"config_name": name, **({"default": True} if name == default else {})})
        entries[-1]["data_files"] = [{"split": s, "path": f"{folder}/{s}-*"} for s in HUB_SPLITS]
    header = yaml.safe_dump({"dataset_info": {"features": features}, "configs": entries}, sort_keys=False)
    return f"---\n{header}---\n\n# Defactify: MS COCOAI\n"


def hub_download(root, configs=None, default=None) -> dict:
    """The Defactify repository as `hf download --repo-type dataset --local-dir root` leaves it: README.md and,
    per config folder, ``<split>-NNNNN-of-NNNNN.parquet`` with the columns Image, Caption, Label_A, Label_B (train:
    4 captions in two shards; validation, test: 2 captions in one). Returns each (folder, split)'s captions."""
    configs = configs or {"default": "data"}
    rng = np.random.default_rng(0)
    captions = {}
    for folder in configs.values():
        (root / folder).mkdir(parents=True)
        for split, n, shards in zip(HUB_SPLITS, (4, 2, 2), (2, 1, 1)):
            text = [f"{folder} {split} {c}: a red house by the sea" for c in reversed(range(n)) for _ in range(6)]
            pixels = rng.integers(0, 255, (len(text), 16, 16, 3), dtype=np.uint8)
            rows = {"Image": [PILImage.fromarray(p) for p in pixels], "Caption": text}
            rows |= {
                "Label_A": [int(i % 6 > 0) for i in range(len(text))],
                "Label_B": [i % 6 for i in range(len(text))],
            }
            ds = Dataset.from_dict(rows, features=HUB_FEATURES)
            for i in range(shards):
                name = f"{split}-{i:05d}-of-{shards:05d}.parquet"
                ds.shard(shards, i, contiguous=True).to_parquet(str(root / folder / name))
            captions[folder, split] = text
    (root / "README.md").write_text(hub_card(configs, default))
    (root / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return captions


def test_a_dataset_downloaded_from_the_hub_is_read_with_its_shards_in_order(tmp_path):
    captions = hub_download(tmp_path / "defactify")
    result, out = run(tmp_path, tmp_path / "defactify")
    assert result.exit_code == 0, result.output
    dsd = open_dataset(out)
    assert {s: list(ds["Caption"]) for s, ds in dsd.items()} == {s: captions["data", s] for s in HUB_SPLITS}
    assert list(dsd["train"]["Label_B"]) == list(range(6)) * 4
    report = json.loads((tmp_path / "prepare.json").read_text())
    assert report["layout"] == "parquet" and report["splits_made_by_caption"] == [] and report["ignored"] == {}


@pytest.mark.parametrize("default", ["named default", "default: true"])
def test_of_several_configs_the_readme_default_is_read(tmp_path, default):
    """The Hub's rule: the config marked ``default: true``, else the one named ``default``."""
    if default == "named default":
        configs, marked, folder = {"default": "data", "small": "small"}, None, "data"
    else:
        configs, marked, folder = {"full": "full", "small": "small"}, "full", "full"
    captions = hub_download(tmp_path / "defactify", configs, marked)
    result, out = run(tmp_path, tmp_path / "defactify")
    assert result.exit_code == 0, result.output
    assert list(open_dataset(out)["train"]["Caption"]) == captions[folder, "train"]


def test_several_configs_and_no_default_is_one_line_naming_them(tmp_path):
    captions = hub_download(tmp_path / "defactify", {"full": "full", "small": "small"})
    result, out = run(tmp_path, tmp_path / "defactify")
    assert result.exit_code == 1 and not out.exists()
    assert result.output.count("\n") == 1, result.output
    assert "2 configs (full/, small/)" in result.output and "prepare.source=" in result.output
    result, out = run(tmp_path, tmp_path / "defactify" / "small")  # the message's way to choose one
    assert result.exit_code == 0, result.output
    assert list(open_dataset(out)["train"]["Caption"]) == captions["small", "train"]


def test_beside_split_folders_a_file_is_counted_and_another_folder_is_an_error(tmp_path):
    root = tmp_path / "mine"
    for split in ("train", "test"):
        class_folders(root / split, classes=("real", "sdxl"))
    (root / "README.md").write_text("photos of 2024")
    (root / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "__MACOSX" / "train").mkdir(parents=True)
    result, out = run(tmp_path, root)
    assert result.exit_code == 0, result.output
    ignored = json.loads((tmp_path / "prepare.json").read_text())["ignored"]
    assert ignored == {".DS_Store": 1, "__MACOSX": 1, "not in a class folder": 3}  # README.md, 2 captions.csv
    shutil.move(str(root / "test"), str(root / "val"))  # a misnamed split is never left out
    result, out = run(tmp_path, root)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "/mine/val: not a split folder (train, validation, test, unlabeled)" in result.output
