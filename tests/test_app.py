"""`aigid app` (aigid.tools.app): the page scores uploaded images as `aigid detect` scores the same files, a file
that is not an image gets its reason in its own row, a request past a limit (size, files, caption) or without files
is one line naming it, the downloaded CSV never runs a formula, and no failure shows a traceback. The page itself
is driven in a headless Chromium (Debian's package, which .ci/run installs) through Playwright."""

import csv
import errno
import io
import json
import re
import shutil
import socket
import subprocess

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from aigid.cli import main
from aigid.tools import app as app_module
from aigid.tools.app import MAX_CAPTION, Limits, cannot_listen, create_app, listen_port
from aigid.tools.detect import columns, detect, render
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


def _post(client, files, **form):
    """POST /score with ``files`` as (name, bytes) pairs and the other form fields ``form``."""
    data = {**form, "files": [(io.BytesIO(b), name) for name, b in files]}
    return client.post("/score", data=data, content_type="multipart/form-data")


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
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 16}}))
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
    assert [r.exc_info[0] for r in caplog.records if r.name == "aigid.tools.app"] == [RuntimeError]
    assert client.get("/nowhere").get_json()["message"].startswith("404 Not Found: ")


def test_a_request_past_a_limit_or_without_files_is_one_line_naming_it_and_nothing_is_scored(tmp_path):
    save_tiny_model(tmp_path / "model")
    client = create_app(tmp_path / "model", None, 64, "auto", Limits(max_mb=1, max_files=3)).test_client()
    assert client.application.config["MAX_CONTENT_LENGTH"] == 1_000_000
    size = "413 Request Entity Too Large: the request is larger than 1 MB, the most this server takes at once "
    size += "(aigid app --max-request-mb): send fewer or smaller files at a time"
    many = "413 Request Entity Too Large: the request holds more than 3 files (or 4 form parts), the most this "
    many += "server takes at once (aigid app --max-files): send fewer at a time"
    answers = {
        "over 1 MB": _post(client, [("big.png", b"x" * 1_000_001)]),
        "4 files": _post(client, [(f"{i}.png", b"x") for i in range(4)], caption="c"),  # Werkzeug's parts limit
        "4 files, no caption": _post(client, [(f"{i}.png", b"x") for i in range(4)]),  # 4 parts: under it
        "5 text parts": _post(client, [], **{f"x{i}": "1" for i in range(5)}),
        "no files": _post(client, [], caption="a caption"),
        "no form": client.post("/score"),
        "a long caption": _post(client, [("a.png", b"x")], caption="c" * (MAX_CAPTION + 1)),
        "chunked": client.post("/score", input_stream=io.BytesIO(b"x"), headers={"Transfer-Encoding": "chunked"}),
    }
    no_files = "400 Bad Request: the request holds no files: send one or more images as the form field 'files'"
    expected = {
        "over 1 MB": (413, size),
        "4 files": (413, many),
        "4 files, no caption": (413, many),
        "5 text parts": (413, many),
        "no files": (400, no_files),
        "no form": (400, no_files),
        "a long caption": (
            400,
            f"400 Bad Request: the caption is {MAX_CAPTION + 1} characters long; at most {MAX_CAPTION} are taken",
        ),
        "chunked": (
            411,
            "411 Length Required: send the request with a Content-Length header (a chunked upload is not taken)",
        ),
    }
    assert {k: (r.status_code, r.get_json()["message"]) for k, r in answers.items()} == expected
    # At the limits, the request is taken: 3 files and a caption, 1 MB in all.
    at_limit = [(name, b"x" * 320_000) for name in ("a.png", "b.png", "c.png")]
    response = _post(client, at_limit, caption="c" * MAX_CAPTION)
    assert response.status_code == 200 and [r["path"] for r in response.get_json()["rows"]] == [
        "a.png",
        "b.png",
        "c.png",
    ]
    # The page says its limits, and holds the messages it shows for a drop past them.
    page = client.get("/").text
    assert "At most 3 files and 1 MB at once; images of\n    up to 89,478,485 pixels each" in page
    assert f'data-too-large="{size.split(": ", 1)[1]}"' in page and f'data-too-many="{many.split(": ", 1)[1]}"' in page
    assert f'maxlength="{MAX_CAPTION}"' in page


def test_an_image_past_the_pixel_guard_or_an_empty_file_is_a_row_with_its_error_and_the_others_are_scored(tmp_path):
    save_tiny_model(tmp_path / "model")
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")  # 100,000,000 pixels in 12 kB
    photo = _images(tmp_path)[0].read_bytes()
    uploads = [("bomb.png", bomb.getvalue()), ("empty.jpg", b""), ("photo.jpg", photo)]
    rows = _post(create_app(tmp_path / "model", None, 64, "auto").test_client(), uploads).get_json()["rows"]
    assert rows[0]["error"].startswith("bomb.png: decompression-bomb guard: ") and rows[0]["prob_ai"] is None
    assert rows[1]["error"] == "empty.jpg: empty image file" and rows[1]["prob_ai"] is None
    assert not rows[2]["error"] and 0 <= rows[2]["prob_ai"] <= 1


def test_the_default_limits_are_64_mb_and_1000_files_and_the_options_set_them():
    assert (Limits().max_bytes, Limits().max_files) == (64_000_000, 1000)
    options = {p.name: p.default for p in app_module.command.params}
    assert (options["max_request_mb"], options["max_files"]) == (64, 1000)


def test_the_downloaded_csv_never_runs_a_formula_while_the_table_shows_the_names_as_they_are(tmp_path):
    save_tiny_model(tmp_path / "model")
    photo = _images(tmp_path)[0].read_bytes()
    names = ["=HYPERLINK('http://x').jpg", "+1.jpg", "-1.jpg", "@SUM(A1).jpg", "\tx.jpg", "'q.jpg", "ok.jpg"]
    uploads = [(name, photo) for name in names] + [("=bad.jpg", b"not an image")]
    client = create_app(tmp_path / "model", None, 64, "auto").test_client()
    response = _post(client, uploads, caption="=1+1")
    body = response.get_json()
    assert [r["path"] for r in body["rows"]] == [*names, "=bad.jpg"]  # the page shows the names as they are
    rows = list(csv.DictReader(io.StringIO(body["csv"])))
    assert [r["path"] for r in rows] == [f"'{n}" for n in names[:5]] + ["'q.jpg", "ok.jpg", "'=bad.jpg"]
    assert {r["caption"] for r in rows[:-1]} == {"'=1+1"} and not rows[-1]["caption"]
    assert rows[-1]["error"] == "'=bad.jpg: cannot decode image: not a recognised image format"
    assert all(float(r["prob_ai"]) >= 0 for r in rows[:-1])  # numbers stay numbers
    # A carriage return cannot lead a file name in a multipart header; it can lead a caption.
    rows = list(csv.DictReader(io.StringIO(_post(client, [("ok.jpg", photo)], caption="\r=1").get_json()["csv"])))
    assert rows[0]["caption"] == "'\r=1"


def test_a_host_that_is_not_this_machines_is_one_line_before_the_model_loads(tmp_path):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: binding fails here, nothing is sent to it.
    with pytest.raises(click.ClickException, match=r"^--host 192.0.2.1: not an address of this machine \("):
        listen_port("192.0.2.1", free_port(), given=True)
    result = CliRunner().invoke(main, ["app", "--host", "192.0.2.1", "--model", str(tmp_path / "none")])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert result.output.startswith("Error: --host 192.0.2.1: not an address of this machine (")
    assert len(result.output.strip().splitlines()) == 1


def test_each_reason_a_server_cannot_listen_is_one_line_naming_the_option_at_fault():
    said = {
        "in use": cannot_listen("127.0.0.1", 8080, OSError(errno.EADDRINUSE, "Address already in use")),
        "privileged": cannot_listen("127.0.0.1", 80, OSError(errno.EACCES, "Permission denied")),
        "unknown name": cannot_listen("nowhere", 80, socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
        "other": cannot_listen("::1", 80, OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")),
    }
    assert {k: e.message for k, e in said.items()} == {
        "in use": "--port 8080: in use by another program; choose another",
        "privileged": "--port 80: this user may not listen on it (ports below 1024 need privileges); choose another",
        "unknown name": "--host nowhere: not an address, nor a name this machine resolves (Name or service not known)",
        "other": "--host ::1 --port 80: cannot listen there (Address family not supported by protocol)",
    }
    with pytest.raises(click.ClickException, match=r"^--host unix:///tmp/s: a Unix socket is not served; "):
        listen_port("unix:///tmp/s", 80, given=False)


def test_a_just_stopped_servers_port_is_free_a_taken_default_gives_way_and_a_taken_chosen_one_is_an_error():
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


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH (.ci/run installs Debian's chromium)")
def test_the_page_says_its_limits_refuses_a_drop_past_them_in_one_line_and_downloads_formulas_as_text(tmp_path):
    from playwright.sync_api import sync_playwright

    save_tiny_model(tmp_path / "model")
    photo = _images(tmp_path)[0]
    formula = tmp_path / "=SUM(1,2).jpg"
    formula.write_bytes(photo.read_bytes())
    (tmp_path / "big.png").write_bytes(b"x" * 1_500_000)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    limits = ["--max-request-mb", "1", "--max-files", "2", "--model", str(tmp_path / "model")]
    server = ["aigid", "app", "--host", "127.0.0.1", "--port", str(port), *limits]
    with local_server(server, url, cwd=tmp_path, env=environment()), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url) if r.url.endswith("/score") else None)
            page.goto(url)
            said = page.inner_text("#limits")
            shown = {}
            for name, chosen in {"many": [photo, photo, formula], "large": [tmp_path / "big.png"]}.items():
                page.set_input_files("#files", [str(p) for p in chosen])
                page.wait_for_selector("#message:not([hidden])")
                shown[name] = page.inner_text("#message")
            sent = list(requests)
            page.set_input_files("#files", [str(formula)])
            page.wait_for_selector("#csv:not([hidden])", timeout=60_000)
            with page.expect_download() as download:
                page.click("#csv")
            downloaded = list(csv.DictReader(open(download.value.path())))
            name = page.inner_text("#results tbody .file")
        finally:
            browser.close()

    assert said.startswith("At most 2 files and 1 MB at once; images of up to 89,478,485 pixels each")
    assert shown == {
        "many": "3 files chosen: the request holds more than 2 files (or 3 form parts), the most this server takes "
        "at once (aigid app --max-files): send fewer at a time",
        "large": "1.5 MB chosen: the request is larger than 1 MB, the most this server takes at once "
        "(aigid app --max-request-mb): send fewer or smaller files at a time",
    }
    assert sent == []  # refused on the page: nothing was uploaded
    assert name == "=SUM(1,2).jpg" and downloaded[0]["path"] == "'=SUM(1,2).jpg"
