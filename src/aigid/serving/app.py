"""`aigid app`: a web page on this machine that scores the images you drop on it.

Drop one or many images (and, if you like, type one caption for them): each gets a row with its file name, the
verdict, P(AI), the generator and every class probability drawn as a bar, and the table downloads as the CSV
`aigid detect` writes. A file that is not a readable image gets its reason in its own row; the others are scored.
The model is the one `aigid detect` would use (or ``--model``), loaded once when the server starts.

The page is one self-contained file (``app.html`` beside this module: HTML, CSS and plain JavaScript, nothing
fetched from elsewhere, so it works offline), served by Flask on werkzeug's threaded server. That server is meant
for a local, single-user tool like this one, not for a public deployment; it listens on 127.0.0.1 unless
``--host`` says otherwise. Gradio is not used: it is not in the lock, it is a large dependency, and it starts
slower than this page, which needs only Flask (already installed with MLflow).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from importlib.resources import files
from pathlib import Path

import click
from flask import Flask, render_template_string, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server, select_address_family

from aigid.core.data import DataError, decode_rgb
from aigid.core.stage import clean_errors
from aigid.detector.scores import Scoring
from aigid.serving.detect import columns, render, scored
from aigid.serving.detect import command as detect_command
from aigid.serving.models import choose_model
from aigid.serving.scorer import scorer

log = logging.getLogger(__name__)
DEFAULT_PORT = 7860
# The options of `aigid detect` that the app takes too, with the same meaning, default and help.
DETECT_OPTIONS = ("model_spec", "threshold", "batch_size", "precision")


def score_uploads(score, uploads: list[tuple[str, bytes]], caption: str, threshold: float | None) -> list[dict]:
    """One row per uploaded ``(file name, bytes)``: the reason in ``error`` where the bytes are not a readable
    image, the scores of ``score`` (see :func:`aigid.serving.scorer.scorer`) for the others."""
    rows, images = [], []
    for name, data in uploads:
        row = {"path": name, "error": ""}
        try:
            decode_rgb({"bytes": data}, name)
        except DataError as err:
            row["error"] = str(err)
        else:
            images.append(data)
        rows.append(row)
    return scored(rows, images, [caption] * len(images), score, threshold)


def one_line(err: Exception) -> str:
    """The page's message for a request that failed: one line, never a traceback."""
    if isinstance(err, HTTPException):
        return f"{err.code} {err.name}: {err.description}"
    text = f"The server could not score these files ({type(err).__name__}: {err}); its log has the details."
    return " ".join(text.split())


def create_app(model_dir: Path, threshold: float | None, batch_size: int, precision: str) -> Flask:
    """The page (``GET /``) and its scoring endpoint (``POST /score``: files ``files``, form field ``caption``;
    answers the columns, the rows and their CSV) for the detector in ``model_dir``, loaded here, once; the other
    arguments are `aigid detect`'s options of those names. What a user must know about the model's scores (it
    was trained on the synthetic demo, or it has no scoring rule) stands above the table."""
    score = scorer(model_dir, batch_size, False, precision)
    notices = Scoring.load(model_dir).notices(str(model_dir))
    fields = columns(json.loads((model_dir / "config.json").read_text())["class_names"])
    page = files(__package__).joinpath("app.html").read_text()
    lock = threading.Lock()  # the server is threaded and the loaded model is shared: one scoring at a time
    app = Flask(__name__)

    @app.get("/")
    def index():
        return render_template_string(page, model=str(model_dir), notices=notices)

    @app.post("/score")
    def score_files():
        uploads = [(f.filename or "upload", f.read()) for f in request.files.getlist("files")]
        with lock:
            rows = score_uploads(score, uploads, request.form.get("caption", ""), threshold)
        table = [{k: r.get(k) for k in fields} for r in rows]
        return {"columns": fields, "rows": table, "csv": render(rows, "csv", fields)}

    @app.errorhandler(Exception)
    def failed(err: Exception):
        if not isinstance(err, HTTPException):
            log.exception("%s %s failed", request.method, request.path)
        return {"message": one_line(err)}, getattr(err, "code", 500)

    return app


def listen_port(host: str, port: int, given: bool) -> int:
    """``port``, or 0 (a free one) when it is the default and another program already listens there."""
    with socket.socket(select_address_family(host, port)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a port just closed is free
        try:
            probe.bind((host, port))
        except OSError:
            if given:
                raise click.ClickException(f"--port {port}: in use by another program; choose another") from None
            return 0
    return port


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
@click.pass_context
@clean_errors
def command(ctx, host, port, model_spec, threshold, batch_size, precision) -> None:
    """Serve a web page that scores the images you drop on it: verdict, P(AI), generator and class probabilities
    per image, and the table as CSV. The model is loaded once, at start; Ctrl+C stops the server."""
    model_dir, why = choose_model(model_spec, precision)
    if why:
        click.echo(f"scoring with {model_dir} ({why}; --model chooses another)", err=True)
    given = ctx.get_parameter_source("port") == click.core.ParameterSource.COMMANDLINE
    app = create_app(model_dir, threshold, batch_size, precision)
    server = make_server(host, listen_port(host, port, given), app, threaded=True)
    click.echo(f"aigid app: http://{host}:{server.port}/ (Ctrl+C stops it)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


command.params[:0] = [p for p in detect_command.params if p.name in DETECT_OPTIONS]
