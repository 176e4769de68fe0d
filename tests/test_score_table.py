"""`aigid score-table`: a Parquet table of image bytes and a folder of the same files, scored on Spark (local[2])
by the registered model through MLflow's spark_udf, give the rows `aigid detect` gives for those files and captions;
a bad cell (a corrupt image, a null, a file that cannot be read or is no regular file) is a row with its error; a
table or an --out that cannot work is one line before Spark starts; a job that fails leaves no --out.

pyspark is an optional extra (`pip install -e .[spark]`): without it this module is skipped. CI installs it
(.ci/run), so there it always runs. Spark also needs Java 17 or newer on the PATH.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from aigid.cli import main
from aigid.tools.score_table import list_images, read_files
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
        timeout=600,  # a Spark job on a loaded machine
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
    pq.write_table(  # the files, and a row with no image
        pa.table({"image": [*(d for d, _ in FILES.values()), None], "caption": [*(c for _, c in FILES.values()), "x"]}),
        store / "table.parquet",
    )
    pd.DataFrame({"path": [f"images/{n}" for n in FILES], "caption": [c for _, c in FILES.values()]}).to_csv(
        store / "captions.csv", index=False
    )

    table = _score_table(store, "table.parquet", "--out", "scored_table")
    assert table.returncode == 3, table.stderr
    assert "2 of 7 row(s) could not be read" in table.stderr and "Traceback" not in table.stderr
    rows = pd.read_parquet(store / "scored_table")
    want = _detect(*(f"images/{n}" for n in FILES), "--captions", "captions.csv")
    assert list(rows.columns) == list(next(iter(want.values())))[1:]  # detect's columns but path, in its order
    assert list(rows["caption"]) == [*(c for _, c in FILES.values()), "x"]  # the table's order
    for got, path in zip(rows.to_dict("records"), want):
        _same_scores(got, want[path])
    assert rows["error"].iloc[-1] == "no image" and pd.isna(rows["verdict"].iloc[-1])

    folder = _score_table(store, "images", "--caption", CAPTION, "--out", "scored_folder")
    assert folder.returncode == 3, folder.stderr
    rows = pd.read_parquet(store / "scored_folder")
    want = _detect("images", "--caption", CAPTION)
    assert list(rows.columns) == list(next(iter(want.values())))
    assert list(rows["path"]) == list(want)  # detect's order: the folder searched recursively
    for got in rows.to_dict("records"):
        _same_scores(got, want[got["path"]])


@pytest.mark.slow
def test_bad_cells_are_rows_with_their_errors_and_a_job_that_fails_leaves_no_out(store):
    _register(store, 0.5)
    bad = _unreadable(store)
    for name in ("red.png", "blue.jpg", "broken.png"):
        (store / name).write_bytes(FILES[name][0])
    (store / "empty.png").write_bytes(b"")
    paths = ["red.png", *bad, "empty.png", "broken.png", "blue.jpg"]
    errors = [*bad.values(), "empty image file", "cannot decode image: not a recognised image format"]
    captions = [None, *("x" for _ in errors), "a blue rectangle " * 10_000]  # a null caption, a huge one
    pq.write_table(pa.table({"path": pa.array(paths, pa.string()), "caption": captions}), store / "paths.parquet")

    # By a URI: Spark reads the table, and its columns are checked there.
    result = _score_table(store, (store / "paths.parquet").as_uri(), "--out", "scored", "--caption", CAPTION)
    assert result.returncode == 3, result.stderr
    assert f"{len(errors)} of {len(paths)} row(s) could not be read" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "Python worker" not in result.stderr
    rows = pd.read_parquet(store / "scored")
    assert [p if isinstance(p, str) else None for p in rows["path"]] == paths  # the table's order
    for got, want in zip(rows["error"][1:-1], errors):
        assert want in got, (got, want)
    assert rows["verdict"][1:-1].isna().all() and rows["verdict"][[0, len(paths) - 1]].notna().all()
    assert list(rows["error"][[0, len(paths) - 1]]) == ["", ""]
    assert list(rows["caption"][[0, len(paths) - 1]]) == [CAPTION, captions[-1]]

    # A table whose footer reads well and whose first page does not: the job fails on Spark, after it started.
    pq.write_table(pa.table({"image": [FILES["red.png"][0]] * 3}), store / "corrupt.parquet", compression="none")
    data = bytearray((store / "corrupt.parquet").read_bytes())
    data[4:36] = b"\xff" * 32  # the first page's header, just after the magic bytes
    (store / "corrupt.parquet").write_bytes(data)
    failed = _score_table(store, "corrupt.parquet", "--out", "never")
    assert failed.returncode == 1, failed.stderr
    assert "Error: corrupt.parquet: scoring into never failed on Spark (" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not [p.name for p in store.iterdir() if "never" in p.name]  # neither --out nor the table beside it


def _unreadable(root) -> dict:
    """Path cells that name no file to read under ``root``, each with the error of its row: a null path (pandas
    hands Spark's null over as NaN), an empty one, a missing file, a folder, a pipe (reading it waits for a
    writer), a device that never ends, a name with a NUL character."""
    (root / "folder").mkdir()
    os.mkfifo(root / "pipe")
    return {
        None: "no path",
        "": "no path",
        "gone.png": "No such file or directory",
        "folder": "a folder, not an image file",
        "pipe": "not a regular file",
        "/dev/zero": "not a regular file",
        "nul\0.png": "embedded null byte",
    }


def test_a_file_that_cannot_be_read_is_a_row_with_its_error(tmp_path):
    (tmp_path / "a.png").write_bytes(FILES["red.png"][0])
    bad = _unreadable(tmp_path)
    paths = [None, "a.png", *bad]  # None first: it failed the batch before anything else was read
    files = [p if p in (None, "", "/dev/zero") else str(tmp_path / p) for p in paths]
    batch = pd.DataFrame({"path": pd.array(paths, dtype="str"), "file": pd.array(files, dtype="str")})
    (read,) = read_files(iter([batch]))
    assert list(read.columns) == ["path", "image", "read_error"]
    assert read["image"][1] == FILES["red.png"][0] and pd.isna(read["read_error"][1])
    for path, error, want in zip(paths[2:], read["read_error"][2:], bad.values()):
        assert want in error, (path, error)
    assert read["image"][2:].isna().all() and read["read_error"][0] == "no path"


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


TABLES = {  # a table that cannot be scored -> its columns
    "image_numbers.parquet": {"image": pa.array([1, 2])},
    "caption_numbers.parquet": {"image": pa.array([b"x"]), "caption": pa.array([3])},
    "path_numbers.parquet": {"path": pa.array([4])},
    "image_struct.parquet": {"image": pa.array([{"bytes": b"x", "path": "a.png"}])},
    "no_rows.parquet": {"image": pa.array([], pa.binary())},
    "no_image.parquet": {"file": pa.array(["a.png"]), "caption": pa.array(["a"])},
}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["empty", "--out", "out"], "empty: no image files and no .parquet files"),
        (["table.parquet", "--out", "taken"], "--out taken: already exists"),
        (["table.parquet", "--out", "gone/out"], "--out gone/out: the folder gone does not exist"),
        (["table.parquet", "--out", "table.parquet/out"], "the folder table.parquet does not exist"),
        (["table.parquet", "--out", "out", "--model", "models:/aigid-detector@nope"], "--model models:/aigid"),
        (["table.parquet", "--out", "out", "--conf", "spark.ui.enabled"], "give KEY=VALUE"),
        (["image_numbers.parquet", "--out", "out"], "column image is int64, not binary or string"),
        (["caption_numbers.parquet", "--out", "out"], "column caption is int64, not string"),
        (["path_numbers.parquet", "--out", "out"], "column path is int64, not string (image files"),
        (["image_struct.parquet", "--out", "out"], "column image is struct<bytes: binary, path: string>, not"),
        (["no_rows.parquet", "--out", "out"], "no_rows.parquet: no rows to score"),
        (["no_image.parquet", "--out", "out"], "a table needs an image column (the encoded image file, as bytes"),
        (["table.csv", "--out", "out"], "table.csv: cannot read it as a Parquet table (Error creating dataset"),
        (["gone.parquet", "--out", "out"], "gone.parquet: no such file or folder"),
        (["tab*.parquet", "--out", "out"], "--model models:/aigid-detector@candidate: cannot read"),  # Spark's glob
    ],
)
def test_bad_arguments_are_one_line_before_spark_starts(tmp_path, monkeypatch, args, message):
    """No model is registered: whatever comes after the model is read (Spark) is never reached."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    pd.DataFrame({"image": [FILES["red.png"][0]]}).to_parquet(tmp_path / "table.parquet")
    pd.DataFrame({"image": ["aGVsbG8="]}).to_csv(tmp_path / "table.csv")
    for name, columns in TABLES.items():
        pq.write_table(pa.table(columns), tmp_path / name)
    result = CliRunner().invoke(main, ["score-table", *args])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    assert result.output.count("Error: ") == 1, result.output


def _folder_permissions_hold() -> bool:
    """Whether this process is refused a folder it may not write (root, or CAP_DAC_OVERRIDE, writes anywhere)."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        try:
            os.mkdir(os.path.join(folder, "x"))
        except PermissionError:
            return True
        finally:
            os.chmod(folder, 0o755)
        return False


@pytest.mark.skipif(not _folder_permissions_hold(), reason="this process writes into any folder (root)")
def test_an_out_in_a_folder_that_cannot_be_written_is_one_line_before_spark_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"image": [FILES["red.png"][0]]}).to_parquet(tmp_path / "table.parquet")
    (tmp_path / "locked").mkdir(mode=0o555)
    result = CliRunner().invoke(main, ["score-table", "table.parquet", "--out", "locked/out"])
    assert result.exit_code == 1 and "--out locked/out: the folder locked is not writable" in result.output
