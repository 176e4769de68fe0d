"""Bad input never crashes and never slips through, written from the user's side: the command, its exit code,
its one-line message, no output that looks finished, and the quarantine report with `on_bad: skip`. Unusual
but valid input keeps working."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from aigid.cli import main
from aigid.core.data import open_dataset
from helpers import REPO, competition, invoke_prepare, run, save_image, save_tiny_model

RAW = Features({"Caption": Value("string"), "Image": Image(), "Label_A": Value("int64"), "Label_B": Value("int64")})


def one_line_error(result) -> str:
    """The command failed with exit status 1 and one `Error: ...` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def failed_prepare(tmp_path, source, **prepare) -> str:
    result, out = run(tmp_path, source, **prepare)
    assert not out.exists() and not (tmp_path / "prepare.json").exists()
    return one_line_error(result)


# ------------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda path: path.write_bytes(bytes(range(256)) * 4), "not an .xlsx workbook (re-save it as .xlsx or .csv)"),
        (lambda path: _zip(path), "not a readable .xlsx workbook"),
    ],
)
def test_a_corrupt_xlsx_is_named(tmp_path, damage, says):
    competition(tmp_path / "ct2")
    damage(tmp_path / "ct2/train/captions.xlsx")
    line = failed_prepare(tmp_path, tmp_path / "ct2")
    assert f"train/captions.xlsx: {says}" in line


def _zip(path):
    """A zip archive that is no workbook (a truncated or foreign file saved as .xlsx)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a spreadsheet")


def test_a_csv_saved_as_xlsx_says_so(tmp_path):
    competition(tmp_path / "ct2")
    (tmp_path / "ct2/train/captions.xlsx").write_text("Index,Caption\n0,a dog\n")
    line = failed_prepare(tmp_path, tmp_path / "ct2")
    assert "captions.xlsx: not an .xlsx workbook (it looks like CSV text: rename it to .csv)" in line


def test_a_captions_csv_that_is_not_utf8_names_the_byte(tmp_path):
    competition(tmp_path / "ct2", table="csv")
    table = tmp_path / "ct2/train/captions.csv"
    table.write_bytes("Index,Caption\n0,un café\n".encode("latin-1"))
    line = failed_prepare(tmp_path, tmp_path / "ct2")
    assert "captions.csv: not UTF-8 text: byte 22 is 0xe9" in line and "UTF-8" in line


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    competition(tmp_path / "ct2", table="csv", n=4)
    table = tmp_path / "ct2/train/captions.csv"
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())
    result, out = run(tmp_path, tmp_path / "ct2")
    assert result.exit_code == 0, result.output
    assert "scene 0: a dog on a sofa" in set(open_dataset(out)["train"]["Caption"]) | set(
        open_dataset(out)["test"]["Caption"]
    )


@pytest.mark.parametrize(
    "cell, says",
    [
        ("sdxl", "is 'sdxl', not an integer"),
        ("", "is blank"),
        ("9", "9 is not one of 0..5"),
        ("2.5", "is '2.5', not an integer"),
    ],
)
def test_a_label_that_is_not_a_class_index_names_row_and_column(tmp_path, cell, says):
    competition(tmp_path / "ct2")
    labels = pd.DataFrame({"Index": [0, 1, 2, 3], "Label_A": [0, 1, 1, 1], "Label_B": ["0", "3", cell, "1"]})
    (tmp_path / "ct2/validation/labels.xlsx").unlink()
    labels.to_csv(tmp_path / "ct2/validation/labels.csv", index=False)
    line = failed_prepare(tmp_path, tmp_path / "ct2")
    assert f"validation/labels.csv row 4, column Label_B: {says}" in line


def test_a_duplicated_index_stops_prepare_naming_both_rows(tmp_path):
    competition(tmp_path / "ct2", table="csv")
    table = tmp_path / "ct2/train/captions.csv"
    frame = pd.read_csv(table)
    frame.loc[5, "Index"] = 2  # row 7 repeats the Index of row 4
    frame.to_csv(table, index=False)
    line = failed_prepare(tmp_path, tmp_path / "ct2")
    assert "train/captions.csv: Index=2 appears in rows 4, 7 (each Index must be unique)" in line


def test_with_on_bad_skip_duplicated_rows_are_quarantined_never_merged(tmp_path):
    competition(tmp_path / "ct2", table="csv")
    table = tmp_path / "ct2/train/captions.csv"
    frame = pd.read_csv(table)
    frame.loc[5, "Index"] = 2
    frame.to_csv(table, index=False)
    result, out = run(tmp_path, tmp_path / "ct2", on_bad="skip")
    assert result.exit_code == 0, result.output
    report = list(csv.DictReader(open(tmp_path / "quarantine.csv")))
    assert [r["reason"] for r in report if r["action"] == "skipped"] == [
        f"{table}: Index=2 appears in rows 4, 7 (each Index must be unique)"
    ]
    captions = [c for split in ("train", "test") for c in open_dataset(out)[split]["Caption"]]
    assert not any(c.startswith(("scene 2:", "scene 5:")) for c in captions)  # neither caption of Index 2
    assert len(captions) == 6 * 6  # 8 captions, 2 rows left out, 6 images each


def test_a_table_with_a_missing_header_is_named(tmp_path):
    competition(tmp_path / "ct2", table="csv")
    (tmp_path / "ct2/train/captions.csv").write_text("0,a dog\n1,a cat\n")
    line = failed_prepare(tmp_path, tmp_path / "ct2")
    assert "captions.csv: missing column(s) Index, Caption" in line


# ---------------------------------------------------------------------------------- split files


def _split(n: int, offset: int = 0, **extra) -> Dataset:
    rows = {"Caption": [], "Image": [], "Label_A": [], "Label_B": []}
    for i in range(n):
        buf = io.BytesIO()
        PILImage.new("RGB", (8, 8), (i * 20 % 255, offset, 0)).save(buf, format="PNG")
        rows["Caption"].append(f"caption {offset + i // 6}")
        rows["Image"].append({"bytes": buf.getvalue(), "path": None})
        rows["Label_A"].append(int(i % 6 > 0))
        rows["Label_B"].append(i % 6)
    features = RAW
    for name, values in extra.items():
        rows[name] = values
        features = Features({**features, name: Value("string")})
    return Dataset.from_dict(rows, features=features)


def test_split_files_with_different_columns_name_each_file(tmp_path):
    src = tmp_path / "pq"
    src.mkdir()
    _split(12).to_parquet(str(src / "train.parquet"))
    _split(6, 50, note=["x"] * 6).to_parquet(str(src / "test.parquet"))
    line = failed_prepare(tmp_path, src)
    assert "the parquet files have different columns" in line
    assert "test.parquet: Caption, Image, Label_A, Label_B, note" in line and "train.parquet: Caption, Image" in line


def test_a_split_file_with_zero_rows_is_named(tmp_path):
    src = tmp_path / "pq"
    src.mkdir()
    _split(12).to_parquet(str(src / "train.parquet"))
    _split(6).select([]).to_parquet(str(src / "test.parquet"))
    line = failed_prepare(tmp_path, src)
    assert f"{src / 'test.parquet'}: no rows" in line


def test_a_split_file_with_an_unknown_name_is_not_silently_dropped(tmp_path):
    src = tmp_path / "pq"
    src.mkdir()
    _split(12).to_parquet(str(src / "train.parquet"))
    _split(6).to_parquet(str(src / "holdout.parquet"))
    line = failed_prepare(tmp_path, src)
    assert "holdout.parquet: cannot tell which split it holds" in line


def _path_rows(src, paths: list[str]) -> None:
    """Rows whose Image holds only a path (no bytes), as tools that reference files write them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(paths)
    pq.write_table(
        pa.Table.from_pydict(
            {
                "Caption": [f"c{i // 6}" for i in range(n)],
                "Image": [{"bytes": None, "path": p} for p in paths],
                "Label_A": [int(i % 6 > 0) for i in range(n)],
                "Label_B": [i % 6 for i in range(n)],
            }
        ),
        src / "train.parquet",
    )


def test_image_paths_in_rows_resolve_against_the_dataset_and_cannot_leave_it(tmp_path):
    src = tmp_path / "pq"
    for i in range(18):
        save_image(src / "images" / f"{i}.png", i)
    _path_rows(src, [f"images/{i}.png" for i in range(18)])  # relative to the dataset, not to the working dir
    result, out = run(tmp_path, src)
    assert result.exit_code == 0, result.output
    assert sum(len(ds) for ds in open_dataset(out).values()) == 18

    shutil.rmtree(out)  # a failed run keeps the previous output; start clean
    (tmp_path / "prepare.json").unlink()
    save_image(tmp_path / "secret.png", 99)
    _path_rows(src, [f"images/{i}.png" for i in range(17)] + ["../secret.png"])
    line = failed_prepare(tmp_path, src)
    assert "train row 17 (../secret.png): Image path: '../secret.png' points outside the dataset root" in line


def test_a_row_with_neither_bytes_nor_a_readable_path_is_a_bad_row(tmp_path):
    src = tmp_path / "pq"
    for i in range(18):
        save_image(src / "images" / f"{i}.png", i)
    _path_rows(src, [f"images/{i}.png" for i in range(17)] + ["images/missing.png"])
    line = failed_prepare(tmp_path, src)
    assert "train row 17 (images/missing.png)" in line and "cannot read image file" in line
    result, out = run(tmp_path, src, on_bad="skip")
    assert result.exit_code == 0, result.output
    (skipped,) = [r for r in csv.DictReader(open(tmp_path / "quarantine.csv")) if r["action"] == "skipped"]
    assert skipped["row"] == "17" and "cannot read image file" in skipped["reason"]


def test_an_empty_or_partial_params_file_is_refused_naming_the_missing_keys(tmp_path):
    (tmp_path / "params.yaml").write_text("")
    result = invoke_prepare(tmp_path)
    assert "must set every key" in one_line_error(result) and not (tmp_path / "prepared").exists()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["prepare"]["on_bad"], params["seed"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = invoke_prepare(tmp_path)
    line = one_line_error(result)
    assert "missing key(s) seed, prepare.on_bad" in line


# --------------------------------------------------------------------------------------- detect


@pytest.fixture
def model(tmp_path):
    save_tiny_model(tmp_path / "model")
    return tmp_path / "model"


def detect(*args, model=None):
    return CliRunner().invoke(main, ["detect", *map(str, args), *(["--model", str(model)] if model else []), "-q"])


def test_detect_refuses_a_model_folder_without_safetensors_before_any_work(tmp_path, model):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"pickle")
    save_image(tmp_path / "a.png", 0)
    line = one_line_error(detect(tmp_path / "a.png", model=tmp_path / "bin"))
    assert "bin: no model.safetensors" in line


def test_detect_refuses_an_out_file_in_a_missing_folder_before_scoring(tmp_path, model):
    save_image(tmp_path / "a.png", 0)
    result = CliRunner().invoke(
        main,
        ["detect", str(tmp_path / "a.png"), "--model", str(model), "--out", str(tmp_path / "nowhere" / "scores.csv")],
    )
    assert "the folder" in one_line_error(result) and not (tmp_path / "nowhere").exists()


def test_detect_on_a_folder_without_images_says_so(tmp_path, model):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    result = detect(tmp_path / "empty", model=model)
    assert "no image files in" in one_line_error(result) and not result.stdout.strip()


def test_detect_with_nothing_scored_fails_and_keeps_the_header(tmp_path, model):
    save_image(tmp_path / "good.png", 0)
    good = detect(tmp_path / "good.png", model=model)
    assert good.exit_code == 0, good.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
    (tmp_path / "bad" / "y.jpg").write_bytes(b"")
    bad = detect(tmp_path / "bad", model=model)
    assert "none of the 2 input(s) could be scored" in one_line_error(bad)
    header = good.stdout.splitlines()[0]
    assert bad.stdout.splitlines()[0] == header and header.startswith("path,error,verdict,prob_ai,label,generator")
    rows = list(csv.DictReader(io.StringIO(bad.stdout)))
    assert [r["prob_ai"] for r in rows] == ["", ""] and all(r["error"] for r in rows)


def test_detect_accepts_unusual_but_valid_images_and_captions(tmp_path, model):
    rng = np.random.default_rng(0)
    folder = tmp_path / "odd"
    folder.mkdir()
    frames = [PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(folder / "pages.tiff", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "photo.webp")
    PILImage.new("RGB", (1, 300), (10, 20, 30)).save(folder / "one_pixel_wide.png")
    long_caption = " ".join(["a very long caption about a dog on a sofa"] * 60)
    result = CliRunner().invoke(
        main, ["detect", str(folder), "--model", str(model), "--caption", long_caption, "--format", "json", "-q"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == [
        "animated.gif",
        "one_pixel_wide.png",
        "pages.tiff",
        "photo.webp",
    ]
    assert all(r["error"] == "" and 0 <= r["prob_ai"] <= 1 and r["caption"] == long_caption for r in rows)


def test_prepare_accepts_unusual_but_valid_images(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "odd"
    for name in ("real", "sd21", "sdxl", "sd3", "dalle3", "midjourney6"):
        frames = [PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
        (root / name).mkdir(parents=True)
        frames[0].save(root / name / "a.gif", save_all=True, append_images=frames[1:])
        frames[0].save(root / name / "b.tiff", save_all=True, append_images=frames[1:])
        frames[0].convert("RGBA").save(root / name / "c.webp")
        PILImage.fromarray(rng.integers(0, 65535, (8, 8)).astype(np.uint16)).save(root / name / "d.png")
        PILImage.new("CMYK", (1, 9)).save(root / name / "e.jpg")
    result, out = run(tmp_path, root)
    assert result.exit_code == 0, result.output
    assert sum(len(ds) for ds in open_dataset(out).values()) == 30
