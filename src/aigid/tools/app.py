"""`aigid app`: a web page on this machine that scores the images you drop on it.

Drop one or many images (and, if you like, type one caption for them): each gets a row with its file name, the
verdict, P(AI), the generator and every class probability drawn as a bar, and the table downloads as the CSV
`aigid detect` writes. A file that is not a readable image gets its reason in its own row; the others are scored.
The model is the one `aigid detect` would use (or ``--model``), loaded once when the server starts.

What one request may carry is bounded and said on the page: its size (``--max-request-mb``), its files
(``--max-files``), its caption (:data:`MAX_CAPTION`), and each image's pixels (the decompression-bomb guard of
:func:`aigid.core.data.decode_rgb`); a request past a limit is answered with one line naming it. The CSV the page
downloads prefixes a single quote to every text cell a spreadsheet would run as a formula (see :func:`as_text`).

The page is one self-contained file (``app.html`` beside this module: HTML, CSS and plain JavaScript, nothing
fetched from elsewhere, so it works offline), served by Flask on werkzeug's threaded server. That server is meant
for a local, single-user tool like this one, not for a public deployment; it listens on 127.0.0.1 unless
``--host`` says otherwise. Gradio is not used: it is not in the lock, it is a large dependency, and it starts
slower than this page, which needs only Flask (already installed with MLflow).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import click
from flask import Flask, render_template_string, request
from werkzeug.exceptions import BadRequest, HTTPException, LengthRequired, RequestEntityTooLarge
from werkzeug.serving import make_server, select_address_family

from aigid.core.data import MAX_PIXELS, DataError, decode_rgb
from aigid.core.stage import clean_errors
from aigid.detector.scores import Scoring
from aigid.serving.portable import decode_side
from aigid.serving.scorer import scorer
from aigid.tools.detect import columns, render, scored
from aigid.tools.detect import command as detect_command
from aigid.tools.models import choose_model

log = logging.getLogger(__name__)
DEFAULT_PORT = 7860
# The options of `aigid detect` that the app takes too, with the same meaning, default and help.
DETECT_OPTIONS = ("model_spec", "threshold", "batch_size", "precision")
MAX_CAPTION = 10_000  # characters; the model reads only its first max_text_length tokens of it
# A cell starting with one of these is run as a formula by spreadsheets (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Limits:
    """What one ``POST /score`` may carry: ``max_mb`` megabytes (10**6 bytes) in all, ``max_files`` files."""

    max_mb: int = 64
    max_files: int = 1000

    @property
    def max_bytes(self) -> int:
        return self.max_mb * 1_000_000

    def too_large(self) -> str:
        return (
            f"the request is larger than {self.max_mb} MB, the most this server takes at once "
            "(aigid app --max-request-mb): send fewer or smaller files at a time"
        )

    def too_many(self) -> str:
        return (
            f"the request holds more than {self.max_files} files (or {self.max_files + 1} form parts), the most this "
            "server takes at once (aigid app --max-files): send fewer at a time"
        )


def received(limits: Limits) -> tuple[list, str]:
    """The uploaded files and the caption of the request being answered, or the HTTP error naming the limit it
    passes. The size is checked on the declared Content-Length before anything is read; Werkzeug's parser then
    enforces the number of form parts (its only limit left, see :func:`create_app`)."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():  # its size is known only once read
        raise LengthRequired("send the request with a Content-Length header (a chunked upload is not taken)")
    if (request.content_length or 0) > limits.max_bytes:
        raise RequestEntityTooLarge(limits.too_large())
    try:
        uploads = request.files.getlist("files")
    except RequestEntityTooLarge:
        raise RequestEntityTooLarge(limits.too_many()) from None
    if len(uploads) > limits.max_files:  # the caption is a part too: a request without one has room for one more
        raise RequestEntityTooLarge(limits.too_many())
    if not uploads:
        raise BadRequest("the request holds no files: send one or more images as the form field 'files'")
    caption = request.form.get("caption", "")
    if len(caption) > MAX_CAPTION:
        raise BadRequest(f"the caption is {len(caption)} characters long; at most {MAX_CAPTION} are taken")
    return uploads, caption


def as_text(value):
    """``value`` as a spreadsheet shows it, never runs it: a string starting with one of
    :data:`FORMULA_STARTS` gets a leading single quote (OWASP's advice); anything else is returned as is."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def score_uploads(
    score, uploads: list[tuple[str, bytes]], caption: str, threshold: float | None, side: int
) -> list[dict]:
    """One row per uploaded ``(file name, bytes)``: the reason in ``error`` where the bytes are not a readable
    image, the scores of ``score`` (see :func:`aigid.serving.scorer.scorer`) for the others. Each image is
    decoded once, reduced to ``side`` (the model's :func:`aigid.serving.portable.decode_side`) as it is read."""
    rows, images = [], []
    for name, data in uploads:
        row = {"path": name, "error": ""}
        try:
            image = decode_rgb({"bytes": data}, name, side=side)
        except DataError as err:
            row["error"] = str(err)
        else:
            images.append(image)
        rows.append(row)
    return scored(rows, images, [caption] * len(images), score, threshold)


def one_line(err: Exception) -> str:
    """The page's message for a request that failed: one line, never a traceback."""
    if isinstance(err, HTTPException):
        return f"{err.code} {err.name}: {err.description}"
    text = f"The server could not score these files ({type(err).__name__}: {err}); its log has the details."
    return " ".join(text.split())


def create_app(
    model_dir: Path, threshold: float | None, batch_size: int, precision: str, limits: Limits = Limits()
) -> Flask:
    """The page (``GET /``) and its scoring endpoint (``POST /score``: files ``files``, form field ``caption``;
    answers the columns, the rows and their CSV, its text cells made safe for spreadsheets) for the detector in
    ``model_dir``, loaded here, once; ``limits`` bound each request; the other arguments are `aigid detect`'s
    options of those names. What a user must know about the model's scores (it was trained on the synthetic demo,
    or it has no scoring rule) stands above the table."""
    score = scorer(model_dir, batch_size, False, precision)
    side = decode_side(model_dir)
    notices = Scoring.load(model_dir).notices(str(model_dir))
    fields = columns(json.loads((model_dir / "config.json").read_text())["class_names"])
    page = files(__package__).joinpath("app.html").read_text()
    lock = threading.Lock()  # the server is threaded and the loaded model is shared: one scoring at a time
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limits.max_bytes
    app.config["MAX_FORM_PARTS"] = limits.max_files + 1  # the files and the caption
    # A text part is bounded by the request's size and the caption by MAX_CAPTION; Werkzeug's own limit on a text
    # part (500 kB) would answer the same 413 as the parts limit, which could then not be told apart.
    app.config["MAX_FORM_MEMORY_SIZE"] = limits.max_bytes
    said = {"limits": limits, "max_pixels": MAX_PIXELS, "max_caption": MAX_CAPTION}  # the page says them

    @app.get("/")
    def index():
        return render_template_string(page, model=str(model_dir), notices=notices, **said)

    @app.post("/score")
    def score_files():
        uploads, caption = received(limits)
        with lock:  # a request waiting here keeps its files as Werkzeug parsed them: on disk past 500 kB each
            files = [(f.filename or "upload", f.read()) for f in uploads]
            rows = score_uploads(score, files, caption, threshold, side)
        table = [{k: r.get(k) for k in fields} for r in rows]
        cells = [{k: as_text(v) for k, v in r.items()} for r in rows]
        return {"columns": fields, "rows": table, "csv": render(cells, "csv", fields)}

    @app.errorhandler(Exception)
    def failed(err: Exception):
        if not isinstance(err, HTTPException):
            log.exception("%s %s failed", request.method, request.path)
        return {"message": one_line(err)}, getattr(err, "code", 500)

    return app


def cannot_listen(host: str, port: int, err: OSError) -> click.ClickException:
    """The one-line error for a server that cannot listen on ``host``:``port``, naming the option at fault."""
    if err.errno == errno.EADDRINUSE:
        why = f"--port {port}: in use by another program; choose another"
    elif err.errno == errno.EACCES:
        why = f"--port {port}: this user may not listen on it (ports below 1024 need privileges); choose another"
    elif isinstance(err, socket.gaierror):
        why = f"--host {host}: not an address, nor a name this machine resolves ({err.strerror})"
    elif err.errno == errno.EADDRNOTAVAIL:
        why = f"--host {host}: not an address of this machine ({err.strerror}); 127.0.0.1 is this machine only"
    else:
        why = f"--host {host} --port {port}: cannot listen there ({err.strerror or err})"
    return click.ClickException(why)


def listen_port(host: str, port: int, given: bool) -> int:
    """``port``, or 0 (a free one) when it is the default and another program already listens there. A host or
    port that cannot be listened on for any other reason is a :func:`cannot_listen` error."""
    family = select_address_family(host, port)
    if family == getattr(socket, "AF_UNIX", None):  # werkzeug's unix:// form
        raise click.ClickException(f"--host {host}: a Unix socket is not served; give an IP address or a host name")
    try:
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server: a port just closed is free
            probe.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE and not given:
            return 0
        raise cannot_listen(host, port, err) from None
    return port


MB_HELP = "The largest request taken, in MB (10^6 bytes): the files of one drop and their caption together."
FILES_HELP = "The most files one request may hold."


@click.command(name="app")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (the default: this machine only)."
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port to listen on; when the default one is taken, a free one. 0: a free one.",
)
@click.option("--max-request-mb", type=click.IntRange(1), default=Limits.max_mb, show_default=True, help=MB_HELP)
@click.option("--max-files", type=click.IntRange(1), default=Limits.max_files, show_default=True, help=FILES_HELP)
@click.pass_context
@clean_errors
def command(ctx, host, port, max_request_mb, max_files, model_spec, threshold, batch_size, precision) -> None:
    """Serve a web page that scores the images you drop on it: verdict, P(AI), generator and class probabilities
    per image, and the table as CSV. The model is loaded once, at start; Ctrl+C stops the server."""
    given = ctx.get_parameter_source("port") == click.core.ParameterSource.COMMANDLINE
    port = listen_port(host, port, given)  # before the model loads: a bad --host or --port fails at once
    model_dir, why = choose_model(model_spec, precision)
    if why:
        click.echo(f"scoring with {model_dir} ({why}; --model chooses another)", err=True)
    app = create_app(model_dir, threshold, batch_size, precision, Limits(max_request_mb, max_files))
    try:
        server = make_server(host, port, app, threaded=True)
    except OSError as err:  # taken between the check and now
        raise cannot_listen(host, port, err) from None
    click.echo(f"aigid app: http://{host}:{server.port}/ (Ctrl+C stops it)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


command.params[:0] = [p for p in detect_command.params if p.name in DETECT_OPTIONS]
