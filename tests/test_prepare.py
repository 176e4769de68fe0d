"""The `prepare` stage (aigid.stages.prepare): good input is stored, bad input stops with the row and the reason or,
with `on_bad: skip`, is quarantined; duplicates are reported, large images stored resized."""

import csv
import io
import json
import os
import tempfile

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Value, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image

from aigid.core.data import open_dataset
from helpers import run, save_image

FEATURES = Features(
    {"Caption": Value("string"), "Image": ImageFeature(), "Label_A": Value("int64"), "Label_B": Value("int64")}
)


def png(seed: int, mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def rows(n_captions: int, offset: int = 0) -> dict:
    out = {"Caption": [], "Image": [], "Label_A": [], "Label_B": []}
    for c in range(n_captions):
        for b in range(6):
            out["Caption"].append(f"caption {offset + c}: a red circle")
            out["Image"].append({"bytes": png(100 * (offset + c) + b), "path": f"img_{offset + c}_{b}.png"})
            out["Label_A"].append(int(b > 0))
            out["Label_B"].append(b)
    return out


def write_source(tmp_path, train: dict, fmt: str = "disk"):
    dsd = DatasetDict(
        train=Dataset.from_dict(train, features=FEATURES), test=Dataset.from_dict(rows(2, offset=50), features=FEATURES)
    )
    src = tmp_path / "source"
    if fmt == "disk":
        dsd.save_to_disk(str(src))
    else:
        src.mkdir()
        for name, ds in dsd.items():
            ds.to_parquet(str(src / f"{name}-00000.parquet"))
    return src


@pytest.mark.parametrize("fmt", ["disk", "parquet"])
def test_good_source_is_stored_with_a_validation_split_made_by_caption(tmp_path, fmt):
    train = rows(10)
    train["Image"][7] = {"bytes": png(7, "RGBA"), "path": "rgba.png"}  # converted, not rejected
    train["Image"][8] = {"bytes": png(8, "L"), "path": "gray.png"}
    train["Image"][9] = {"bytes": _cmyk_jpeg(), "path": "cmyk.jpg"}
    train["Caption"][12] = ""  # allowed
    train["Caption"][18] = "un café près de la tour, 東京"  # allowed
    result, out = run(tmp_path, write_source(tmp_path, train, fmt))
    assert result.exit_code == 0, result.output
    dsd = load_from_disk(str(out))
    assert set(dsd) == {"train", "validation", "test"}
    assert len(dsd["train"]) + len(dsd["validation"]) == 60
    assert not set(dsd["train"]["Caption"]) & set(dsd["validation"]["Caption"])
    metrics = json.loads((tmp_path / "prepare.json").read_text())
    assert metrics["shared_captions_train_validation"] == 0
    assert metrics["splits_made_by_caption"] == ["validation"]
    # Every image is a 20x20 PNG but one CMYK JPEG (train row 9: Label_B 3, sd3).
    formats = [(split, name, f) for split, per in metrics["formats"].items() for name, f in per.items()]
    assert sum(f["n"] for _, _, f in formats) == 72 and sum(f["other"] for _, _, f in formats) == 0
    assert [(name, f["JPEG"]) for _, name, f in formats if f["JPEG"]] == [("sd3", 1)]
    assert all(f["JPEG"] + f["PNG"] == f["n"] and f["median_shorter_side"] == 20 for _, _, f in formats)


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (20, 20), (10, 200, 30, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _truncated() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:200]


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda t: t["Image"].__setitem__(4, {"bytes": _truncated(), "path": "broken.jpg"}),
            r"train row 4 \(broken.jpg\): cannot decode image",
        ),
        (
            lambda t: t["Image"].__setitem__(5, {"bytes": b"hello, not an image", "path": "notes.txt"}),
            r"train row 5 \(notes.txt\): cannot decode image",
        ),
        (lambda t: t["Image"].__setitem__(3, {"bytes": b"", "path": "empty.png"}), r"empty.png.*empty image file"),
        (lambda t: t["Label_B"].__setitem__(2, 7), r"train row 2 \(img_0_2.png\): Label_B=7 is not a known class"),
        (
            lambda t: t["Label_A"].__setitem__(1, 3),
            r"train row 1 \(img_0_1.png\): Label_A=3 is not 0 \(real\) or 1 \(AI\)",
        ),
        (lambda t: t["Label_A"].__setitem__(0, 1), r"train row 0 \(img_0_0.png\): Label_A=1 contradicts Label_B=0"),
    ],
)
def test_bad_row_stops_prepare_naming_the_row_and_leaves_no_output(tmp_path, break_it, message):
    train = rows(3)
    break_it(train)
    result, out = run(tmp_path, write_source(tmp_path, train))
    assert result.exit_code != 0
    assert result.output.startswith("Error: ")
    import re

    assert re.search(message, result.output), result.output
    assert not out.exists() and not (tmp_path / "prepare.json").exists()


def test_missing_column_is_named(tmp_path):
    train = rows(2)
    del train["Label_B"]
    src = tmp_path / "source"
    DatasetDict(train=Dataset.from_dict(train), test=Dataset.from_dict(rows(1))).save_to_disk(str(src))
    result, out = run(tmp_path, src)
    assert result.exit_code != 0 and "split train: missing column(s) Label_B" in result.output
    assert not out.exists()


def test_missing_image_file_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = write_source(tmp_path, rows(2), "parquet")
    train = rows(2)
    train["Image"][3] = {"bytes": None, "path": str(tmp_path / "gone.jpg")}  # a path that points nowhere
    pq.write_table(pa.Table.from_pydict(train), src / "train-00000.parquet")
    result, out = run(tmp_path, src)
    assert result.exit_code != 0 and "gone.jpg" in result.output, result.output
    assert not out.exists()


def test_split_with_no_samples_is_named(tmp_path):
    src = tmp_path / "source"
    empty = Dataset.from_dict(rows(1), features=FEATURES).select([])
    DatasetDict(train=Dataset.from_dict(rows(3), features=FEATURES), test=empty).save_to_disk(
        str(src), num_shards={"test": 1}
    )
    result, out = run(tmp_path, src)
    assert result.exit_code != 0 and "split test: no samples" in result.output
    assert not out.exists()


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


def test_large_images_are_stored_resized_to_max_side(tmp_path):
    root = tmp_path / "mine"
    for name in ("real", "sdxl"):
        for i in range(6):
            save_image(root / name / f"{i}.png", i, size=(120, 90))
    result, out = run(tmp_path, root, max_side=30)
    assert result.exit_code == 0, result.output
    image = open_dataset(out)["train"][0]["Image"]
    assert Image.open(io.BytesIO(image["bytes"])).size == (40, 30)


def _good_folders(root):
    for i in range(6):
        save_image(root / "real" / f"ok_{i}.png", i)
        save_image(root / "sdxl" / f"ok_{i}.jpg", 50 + i)


# What a class-folder dataset may hold that is not an image: made in `root`, named as the quarantine names it.
BAD_ENTRIES = {
    "gone.png": (lambda root: (root / "real" / "gone.png").symlink_to("missing.png"), "broken symbolic link"),
    "loop.png": (lambda root: (root / "real" / "loop.png").symlink_to("loop.png"), "symbolic link loop"),
    "x.png": (lambda root: (root / "sdxl" / "x.png").mkdir(), "a folder, not an image file"),
    "notes.txt": (lambda root: (root / "sdxl" / "notes.txt").write_text("shot on a phone"), "cannot decode image"),
}


@pytest.mark.parametrize("name", BAD_ENTRIES)
def test_an_entry_that_is_not_an_image_stops_prepare_in_one_line_naming_it(tmp_path, name):
    make, reason = BAD_ENTRIES[name]
    _good_folders(tmp_path / "mine")
    make(tmp_path / "mine")
    result, out = run(tmp_path, tmp_path / "mine")
    assert result.exit_code == 1 and not out.exists()
    assert result.output.count("\n") == 1 and f"/{name}): {reason}" in result.output, result.output


def _permissions_hold() -> bool:
    """Whether this process is refused a file it may not read (root, or CAP_DAC_OVERRIDE, reads anything)."""
    with tempfile.NamedTemporaryFile() as f:
        os.chmod(f.name, 0)
        try:
            open(f.name).close()
        except PermissionError:
            return True
        return False


@pytest.mark.skipif(not _permissions_hold(), reason="this process reads a file whatever its permissions (root)")
@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_an_unreadable_image_file_is_a_bad_row(tmp_path, on_bad):
    _good_folders(tmp_path / "mine")
    save_image(tmp_path / "mine" / "real" / "locked.png", 99)
    (tmp_path / "mine" / "real" / "locked.png").chmod(0)
    result, _ = run(tmp_path, tmp_path / "mine", on_bad=on_bad)
    if on_bad == "error":
        assert result.exit_code == 1 and "/locked.png): cannot read image file: Permission denied" in result.output
    else:
        assert result.exit_code == 0, result.output
        report = list(csv.DictReader(open(tmp_path / "quarantine.csv")))
        assert [(r["file"].rsplit("/", 1)[-1], r["reason"]) for r in report] == [
            ("locked.png", "cannot read image file: Permission denied")
        ]


def _junk(root):
    """What operating systems and archivers leave in a folder, and a README beside the class folders."""
    for name in ("real", "sdxl"):
        save_image(root / "__MACOSX" / name / f"._ok_{name}.png", 7)  # zip's resource forks
    (root / "real" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "sdxl" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "sdxl" / "._ok_1.jpg").write_bytes(b"\0\5\26\7")  # AppleDouble
    (root / "README.md").write_text("my photos")


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_os_junk_is_ignored_and_counted_and_every_other_entry_is_a_row(tmp_path, on_bad):
    root = tmp_path / "mine"
    _good_folders(root)
    _junk(root)
    if on_bad == "skip":
        for make, _ in BAD_ENTRIES.values():
            make(root)
    result, out = run(tmp_path, root, on_bad=on_bad)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "prepare.json").read_text())
    assert report["ignored"] == {".DS_Store": 1, "Thumbs.db": 1, "__MACOSX": 1, "hidden": 1, "not in a class folder": 1}
    assert sum(len(ds) for ds in open_dataset(out).values()) == 12
    quarantined = list(csv.DictReader(open(tmp_path / "quarantine.csv")))
    skipped = {r["file"].rsplit("/", 1)[-1]: r["reason"] for r in quarantined if r["action"] == "skipped"}
    assert report["skipped"]["total"] == len(skipped) == (4 if on_bad == "skip" else 0)
    assert all(skipped[name].startswith(reason) for name, (_, reason) in BAD_ENTRIES.items() if on_bad == "skip")


@pytest.mark.skipif(not _permissions_hold(), reason="this process reads a folder whatever its permissions (root)")
def test_an_unreadable_class_folder_is_one_line_naming_it(tmp_path):
    _good_folders(tmp_path / "mine")
    (tmp_path / "mine" / "sdxl").chmod(0)
    result, out = run(tmp_path, tmp_path / "mine", on_bad="skip")
    (tmp_path / "mine" / "sdxl").chmod(0o755)
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().endswith("/sdxl: cannot list the folder (Permission denied)"), result.output
