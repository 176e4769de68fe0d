"""The registered model over HTTP: `mlflow models serve` answers /invocations with the rows `aigid detect` writes
(on the registered model, its torch directory and its exported form alike), and a corrupt image is a row with its
error, never a server error."""

from __future__ import annotations

import base64
import io
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from aigid.cli import main
from helpers import _register, free_port, local_server

pytestmark = pytest.mark.slow


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def server(store):
    _register(store, 0.5)
    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    url = f"http://127.0.0.1:{port}"
    with local_server(
        [
            str(mlflow_cli),
            "models",
            "serve",
            "-m",
            "models:/aigid-detector@candidate",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        f"{url}/ping",
        cwd=store,
    ):
        yield url


def _image(fmt: str, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 28), color).save(buf, format=fmt)
    return buf.getvalue()


def test_served_model_scores_like_detect_and_names_the_corrupt_row(server, store, tmp_path):
    files = {
        "a.png": _image("PNG", (200, 30, 30)),
        "b.jpg": _image("JPEG", (20, 120, 220)),
        "broken.png": b"\x89PNG\r\n\x1a\n not really",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    caption = "a coloured rectangle"
    rows = [[base64.b64encode(data).decode(), caption] for data in files.values()]
    status, body = _post(f"{server}/invocations", {"dataframe_split": {"columns": ["image", "caption"], "data": rows}})
    assert status == 200, body
    served = body["predictions"]
    assert [bool(r["error"]) for r in served] == [False, False, True]
    assert served[2]["error"].startswith("row 2: ") and served[2]["prob_ai"] is None

    result = CliRunner().invoke(
        main,
        [
            "detect",
            *(str(tmp_path / n) for n in files),
            "--model",
            "models:/aigid-detector@candidate",
            "--caption",
            caption,
            "--format",
            "json",
            "--out",
            str(tmp_path / "rows.json"),
            "-q",
        ],
    )
    assert result.exit_code == 3, result.output  # 3: some inputs could not be read
    detected = json.loads((tmp_path / "rows.json").read_text())
    for mine, theirs in zip(served[:2], detected[:2]):
        assert {k: v for k, v in theirs.items() if k not in ("path", "prob_ai") and not k.startswith("p_")} == {
            k: v for k, v in mine.items() if k in theirs and k not in ("path", "prob_ai") and not k.startswith("p_")
        }
        assert mine["prob_ai"] == pytest.approx(theirs["prob_ai"], abs=1e-6)
        assert all(mine[k] == pytest.approx(theirs[k], abs=1e-6) for k in theirs if k.startswith("p_"))
    assert [list(r) for r in served] == [[k for k in r if k != "path"] for r in detected]  # the same columns
    assert detected[2]["error"] and detected[2]["prob_ai"] is None

    # The three scoring paths: served (the registered exported form), `aigid detect` on the torch model directory
    # and on the exported one: the same calibrated P(AI) and verdict.
    for local in ("model", "portable"):
        args = ["detect", *(str(tmp_path / n) for n in list(files)[:2]), "--model", str(store / local)]
        scored = json.loads(CliRunner().invoke(main, [*args, "--caption", caption, "--format", "json", "-q"]).stdout)
        for mine, theirs in zip(served[:2], scored):
            assert mine["prob_ai"] == pytest.approx(theirs["prob_ai"], abs=1e-5)
            assert mine["verdict"] == theirs["verdict"]

    # No caption column at all: every image is scored with an empty caption; a request without images is a 400.
    status, body = _post(f"{server}/invocations", {"dataframe_split": {"columns": ["image"], "data": [rows[0][:1]]}})
    assert status == 200 and body["predictions"][0]["caption"] == "" and body["predictions"][0]["error"] == ""
    status, body = _post(f"{server}/invocations", {"dataframe_split": {"columns": ["caption"], "data": [["x"]]}})
    assert status == 400 and "missing inputs ['image']" in body["message"]
