"""`aigid score-table`: a Parquet table of image bytes and a folder of the same files, scored on Spark (local[2])
by the registered model through MLflow's spark_udf, give the rows `aigid detect` gives for those files and captions;
a corrupt image is a row with its error, and a file that cannot be read too.

pyspark is an optional extra (`pip install -e .[spark]`): without it this module is skipped. CI installs it
(.ci/run), so there it always runs. Spark also needs Java 17 or newer on the PATH.
"""

from __future__ import annotations

import io
import json
import subprocess

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from aigid.cli import main
from aigid.serving.score_table import list_images, read_files
from helpers import _register, environment

pytest.importorskip("pyspark")

# Spark kept small: no web UI, two shuffle partitions, 1 GB for the driver.
SMALL_SPARK = ("spark.ui.enabled=false", "spark.sql.shuffle.partitions=2", "spark.driver.memory=1g")
CAPTION = "a coloured rectangle"


def _image(fmt: str, color, size, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


FILES = {  # name -> (encoded file, its caption in the table)
    "red.png": (_image("PNG", (200, 30, 30), (40, 28)), "a red rectangle"),
    "blue.jpg": (_image("JPEG", (20, 120, 220), (33, 47)), "a blue rectangle"),
    "broken.png": (b"not an image", "a file that is no image"),
    "sub/grey.png": (_image("PNG", 90, (24, 24), "L"), ""),
    "sub/green.jpg": (_image("JPEG", (10, 200, 40), (64, 20)), "a green rectangle"),
    "sub/clear.png": (_image("PNG", (250, 250, 10, 128), (30, 30), "RGBA"), "a yellow square"),
}
SCORES = ("verdict", "label", "generator", "threshold")


def _score_table(cwd, *args: str) -> subprocess.CompletedProcess:
    conf = [arg for setting in SMALL_SPARK for arg in ("--conf", setting)]
    return subprocess.run(
        ["aigid", "score-table", *args, "--master", "local[2]", *conf],
        cwd=cwd,
        env=environment(MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _detect(*args: str) -> dict[str, dict]:
    result = CliRunner().invoke(
        main, ["detect", *args, "--model", "models:/aigid-detector@candidate", "--format", "json", "-q"]
    )
    assert result.exit_code == 3, result.output  # the broken file
    return {row["path"]: row for row in json.loads(result.stdout)}


def _same_scores(got: dict, want: dict) -> None:
    assert bool(got["error"]) == bool(want["error"]), (got, want)
    if want["error"]:
        assert want["error"].endswith(got["error"]) and "cannot decode image" in got["error"]
        assert all(pd.isna(got[k]) for k in ("prob_ai", *SCORES, "p_real")), got
        return
    assert {k: got[k] for k in SCORES} == {k: want[k] for k in SCORES}
    for key in [k for k in want if k == "prob_ai" or k.startswith("p_")]:
        assert got[key] == pytest.approx(want[key], abs=1e-5), key


@pytest.mark.slow
def test_a_table_and_a_folder_score_on_spark_as_detect_scores_them(store):
    _register(store, 0.5)
    for name, (data, _) in FILES.items():
        (store / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (store / "images" / name).write_bytes(data)
    pd.DataFrame({"image": [d for d, _ in FILES.values()], "caption": [c for _, c in FILES.values()]}).to_parquet(
        store / "table.parquet"
    )
    pd.DataFrame({"path": [f"images/{n}" for n in FILES], "caption": [c for _, c in FILES.values()]}).to_csv(
        store / "captions.csv", index=False
    )

    table = _score_table(store, "table.parquet", "--out", "scored_table")
    assert table.returncode == 3, table.stderr
    assert "1 of 6 row(s) could not be read" in table.stderr and "Traceback" not in table.stderr
    rows = pd.read_parquet(store / "scored_table")
    want = _detect(*(f"images/{n}" for n in FILES), "--captions", "captions.csv")
    assert list(rows.columns) == list(next(iter(want.values())))[1:]  # detect's columns but path, in its order
    assert list(rows["caption"]) == [c for _, c in FILES.values()]  # the table's order
    for got, path in zip(rows.to_dict("records"), want):
        _same_scores(got, want[path])

    folder = _score_table(store, "images", "--caption", CAPTION, "--out", "scored_folder")
    assert folder.returncode == 3, folder.stderr
    rows = pd.read_parquet(store / "scored_folder")
    want = _detect("images", "--caption", CAPTION)
    assert list(rows.columns) == list(next(iter(want.values())))
    assert list(rows["path"]) == list(want)  # detect's order: the folder searched recursively
    for got in rows.to_dict("records"):
        _same_scores(got, want[got["path"]])


def test_a_file_that_cannot_be_read_is_a_row_with_its_error(tmp_path):
    (tmp_path / "a.png").write_bytes(FILES["red.png"][0])
    batch = pd.DataFrame({"path": ["a.png", "gone.png"], "file": [str(tmp_path / "a.png"), str(tmp_path / "gone")]})
    (read,) = read_files(iter([batch]))
    assert list(read.columns) == ["path", "image", "read_error"]
    assert read["image"][0] == FILES["red.png"][0] and pd.isna(read["read_error"][0])
    assert read["image"][1] is None and "No such file or directory" in read["read_error"][1]


def test_a_folder_is_listed_as_detect_lists_it_and_a_parquet_folder_is_a_table(tmp_path):
    for name, (data, _) in FILES.items():
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / name).write_bytes(data)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(str(tmp_path / "images"))] == [
        "blue.jpg",
        "broken.png",
        "red.png",
        "clear.png",
        "green.jpg",
        "grey.png",
    ]
    (tmp_path / "table").mkdir()
    pd.DataFrame({"path": ["x.png"]}).to_parquet(tmp_path / "table" / "part-0.parquet")
    assert list_images(str(tmp_path / "table")) is None and list_images("s3a://bucket/table") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["empty", "--out", "out"], "empty: no image files and no .parquet files"),
        (["table.parquet", "--out", "taken"], "--out taken: already exists"),
        (["table.parquet", "--out", "out", "--model", "models:/aigid-detector@nope"], "--model models:/aigid"),
        (["table.parquet", "--out", "out", "--conf", "spark.ui.enabled"], "give KEY=VALUE"),
    ],
)
def test_bad_arguments_are_one_line_before_spark_starts(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    pd.DataFrame({"image": [FILES["red.png"][0]]}).to_parquet(tmp_path / "table.parquet")
    result = CliRunner().invoke(main, ["score-table", *args])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
