"""`aigid app` (aigid.serving.app): the page scores uploaded images as `aigid detect` scores the same files, a file
that is not an image gets its reason in its own row, and no failure shows a traceback. The page itself is driven in
a headless Chromium (Debian's package, which .ci/run installs) through Playwright."""

import csv
import io
import json
import re
import shutil
import subprocess

import click
import pytest
from PIL import Image

from aigid.serving import app as app_module
from aigid.serving.app import create_app, listen_port
from aigid.serving.detect import columns, detect, render
from helpers import CT2, TINY_SCORING, environment, export_portable, free_port, local_server, save_tiny_model

CHROMIUM = shutil.which("chromium")
BAD = "bad.jpg: cannot decode image: not a recognised image format"


def _images(folder):
    """A real JPEG (colour gradients) and a file named .jpg that is not an image, in ``folder``."""
    red, green = Image.linear_gradient("L"), Image.radial_gradient("L")
    photo = Image.merge("RGB", (red, green, Image.new("L", red.size, 90))).resize((48, 40))
    photo.save(folder / "photo.jpg", quality=90)
    (folder / "bad.jpg").write_bytes(b"not an image")
    return [folder / "photo.jpg", folder / "bad.jpg"]


def _upload(client, paths, caption=""):
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in paths]
    return client.post("/score", data={"caption": caption, "files": files}, content_type="multipart/form-data")


def test_an_upload_is_scored_as_detect_scores_the_file_and_a_corrupt_one_gets_its_reason(tmp_path):
    save_tiny_model(tmp_path / "model")
    paths = _images(tmp_path)
    response = _upload(create_app(tmp_path / "model", None, 64, "auto").test_client(), paths, "a red circle")
    assert response.status_code == 200 and b"Traceback" not in response.data
    body = response.get_json()
    fields = columns(CT2)
    assert body["columns"] == fields
    expected = detect(paths, tmp_path / "model", caption="a red circle")  # the model's own rule, as the app's
    for row, path in zip(expected, paths):  # the page names an upload by its file name, not its path
        row["path"], row["error"] = path.name, row["error"].replace(f"{tmp_path}/", "")
    assert expected[1]["error"] == BAD
    assert body["rows"] == [{k: r.get(k) for k in fields} for r in expected]
    assert body["csv"] == render(expected, "csv", fields)


def test_the_page_is_self_contained_and_a_failure_is_one_line_logged_on_the_server(tmp_path, monkeypatch, caplog):
    def failing(*_):
        raise RuntimeError("out of memory\nwhile scoring")

    (tmp_path / "config.json").write_text(json.dumps({"class_names": CT2}))
    monkeypatch.setattr(app_module, "scorer", lambda *_: failing)
    client = create_app(tmp_path, 0.5, 64, "auto").test_client()
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    # Nothing is fetched from elsewhere: no address in an attribute, a style or a script.
    assert set(re.findall(r'(?:href|src)="([^"]*)"', page.text)) == {"data:,", "#"}
    assert not any(ref in page.text for ref in ("http:", "https:", "url(", "@import", "import("))
    assert str(tmp_path) in page.text  # the model it scores with

    response = _upload(client, _images(tmp_path))
    assert response.status_code == 500
    assert response.get_json() == {
        "message": "The server could not score these files (RuntimeError: out of memory while scoring); "
        "its log has the details."
    }
    assert [r.exc_info[0] for r in caplog.records if r.name == "aigid.serving.app"] == [RuntimeError]
    assert client.get("/nowhere").get_json()["message"].startswith("404 Not Found: ")


def test_a_just_stopped_servers_port_is_free_a_taken_default_gives_way_and_a_taken_chosen_one_is_an_error():
    import socket

    port = free_port()
    with socket.create_server(("127.0.0.1", port)) as server, socket.create_connection(("127.0.0.1", port)):
        server.accept()[0].close()  # the server closes first: its side of the connection waits (TIME_WAIT)
    assert listen_port("127.0.0.1", port, given=True) == port  # a server that just stopped leaves its port free
    with socket.create_server(("127.0.0.1", port)):  # another program listens there
        assert listen_port("127.0.0.1", port, given=False) == 0
        with pytest.raises(click.ClickException, match=f"--port {port}: in use by another program"):
            listen_port("127.0.0.1", port, given=True)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH (.ci/run installs Debian's chromium)")
def test_the_page_in_a_browser_shows_detects_scores_and_a_corrupt_files_reason_and_downloads_them(tmp_path):
    from playwright.sync_api import sync_playwright

    save_tiny_model(tmp_path / "models/retrained", dict(TINY_SCORING, trained_on={"source": "demo", "synthetic": True}))
    export_portable(tmp_path / "models/retrained", tmp_path / "models/portable")
    paths = _images(tmp_path)
    options = ["--caption", "a red circle", "--out", "detect.csv", "-q"]  # detect and app: the same default model
    run = subprocess.run(["aigid", "detect", "photo.jpg", *options], cwd=tmp_path, env=environment(), text=True)
    assert run.returncode == 0
    expected = next(csv.DictReader((tmp_path / "detect.csv").open()))

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = ["aigid", "app", "--host", "127.0.0.1", "--port", str(port)]
    with local_server(server, url, cwd=tmp_path, env=environment()), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.fill("#caption", "a red circle")
            page.set_input_files("#files", [str(p) for p in paths])
            page.wait_for_selector("#csv:not([hidden])", timeout=60_000)
            photo, bad = page.locator("#results tbody tr").all()
            shown = {
                "file": photo.locator(".file").inner_text(),
                "verdict": photo.locator(".verdict").inner_text(),
                "prob_ai": float(photo.locator(".prob-ai").get_attribute("data-value")),
                "generator": photo.locator(".generator").inner_text(),
                "bad": [bad.locator(".file").inner_text(), bad.locator(".error").inner_text()],
            }
            with page.expect_download() as download:
                page.click("#csv")
            downloaded = list(csv.DictReader(open(download.value.path())))
            text, notice = page.content(), page.inner_text(".notice")
            # A failed request whose answer is not the app's (a proxy's error page, say) is one line too.
            page.route("**/score", lambda route: route.fulfill(status=502, body="Traceback (most recent call last)"))
            page.set_input_files("#files", [str(paths[0])])
            page.wait_for_selector("#message:not([hidden])")
            failure = [page.inner_text("#message"), page.content()]
        finally:
            browser.close()

    assert shown["file"] == "photo.jpg" and shown["generator"] == expected["generator"]
    assert shown["verdict"] == expected.get("verdict", expected["label"])
    assert abs(shown["prob_ai"] - float(expected["prob_ai"])) < 1e-5
    assert shown["bad"] == ["bad.jpg", BAD]
    assert "Traceback" not in text
    assert "trained on the embedded synthetic demo data" in notice  # said once, above the table
    assert failure[0].startswith("502") and "Traceback" not in failure[1]
    assert downloaded[0] == expected
    assert downloaded[1]["path"] == "bad.jpg" and downloaded[1]["error"] == BAD and not downloaded[1]["prob_ai"]
