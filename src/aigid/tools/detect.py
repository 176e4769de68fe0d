"""Score your own images: files, folders or globs, with or without captions, in batches.

Exit status of `aigid detect`: 0 every input was scored; 1 nothing was scored (a bad --model, --out,
--captions or --threshold-from, no image found, or no input readable); 2 a command-line usage error; 3 some
inputs could not be read (their rows carry the reason in ``error``, the others are scored).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from aigid.core.data import DataError, decode_rgb, image_suffixes
from aigid.core.precision import PRECISIONS
from aigid.core.stage import clean_errors
from aigid.detector.scores import Scoring, output_columns
from aigid.serving.portable import decode_side
from aigid.serving.scorer import scorer
from aigid.tools.models import choose_model

SOME_FAILED = 3  # exit status when some inputs could not be read
# Threads that read and decode files (Pillow lets go of the GIL while it decodes): a few, since each may hold one
# image's encoded bytes and, below aigid.core.data.WHOLE_DECODE_PIXELS, its whole pixels.
DECODE_THREADS = min(4, os.cpu_count() or 1)


def columns(class_names) -> list[str]:
    """The output columns, the same whatever happened to the inputs."""
    return ["path", *output_columns(class_names)]


def expand(inputs: list[str]) -> list[str]:
    """Files as given, folders searched recursively for images, globs expanded; order kept, no repeats. The paths
    are kept as strings (normalised as Path writes them, a folder's sorted as Paths sort), so that a folder of a
    hundred thousand images costs a few MB."""
    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(_images_in(path), key=_parts)
        elif path.exists():
            found.append(str(path))
        else:
            matches = sorted((str(Path(p)) for p in glob.glob(item, recursive=True) if Path(p).is_file()), key=_parts)
            found += matches or [str(path)]  # a missing file is reported as a row, not dropped
    return list(dict.fromkeys(found))


def _images_in(folder: Path) -> Iterator[str]:
    """The image files below ``folder`` (symbolic links to files included, to folders not followed), as
    ``folder.rglob`` finds them, without the set of every path it keeps. An image file is one of a format
    Pillow opens (:func:`aigid.core.data.image_suffixes`, as prepare reads folders)."""
    suffixes = image_suffixes()
    for parent, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(parent, name)
            if os.path.splitext(name)[1].lower() in suffixes and os.path.isfile(full):
                yield full


def _parts(path: str) -> str:
    """The sort key of a normalised path that orders as Paths do, by their parts: the separator sorts first."""
    return path.replace("/", "\0")


def detect(paths: list[Path | str], model_dir: Path, captions: dict[str, str] | None = None, **options) -> list[dict]:
    """One row per path: the verdict, calibrated P(AI), the label, the generator and every class probability, by
    the model's own rule (its scoring.json) or, with ``threshold``, at that one cut; ``options`` are
    :func:`iter_detect`'s.

    A file that cannot be read gets a row with its ``error`` and no scores; the rest are still scored.
    ``progress`` shows bars (files checked, batches scored) on stderr. A portable detector directory
    (:mod:`aigid.serving.portable`) is scored by onnxruntime, in float32, without importing torch; any other by torch.
    """
    return list(iter_detect(paths, model_dir, captions, **options))


def iter_detect(
    paths: list[Path | str],
    model_dir: Path,
    captions: dict[str, str] | None = None,
    *,
    caption: str = "",
    threshold: float | None = None,
    batch_size: int = 64,
    progress: bool = False,
    precision: str = "auto",
) -> Iterator[dict]:
    """:func:`detect`'s rows as they are scored, in the paths' order. Files are read, decoded and scored a batch at
    a time (:func:`_rows`): memory is bounded by the batch, however many files there are and however large. The
    model is loaded here, before any row: a model that cannot be loaded fails before
    anything is written."""
    score = scorer(model_dir, batch_size, progress, precision)
    side = decode_side(model_dir)
    return _rows(paths, score, captions or {}, caption, threshold, batch_size, progress, side)


def _rows(paths, score, captions: dict[str, str], caption: str, threshold, batch_size: int, progress: bool, side: int):
    """The rows of :func:`iter_detect`, scored by ``score``. Files are read and decoded, reduced to ``side``
    (:func:`aigid.core.data.decode_rgb`), by :data:`DECODE_THREADS` threads, a batch at a time; the next batch is
    decoded while one is scored. Memory holds two batches of reduced images; a file's bytes live only while it
    is decoded."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="reading", unit="file", file=sys.stderr, disable=not progress)
    with bar, ThreadPoolExecutor(DECODE_THREADS) as pool:
        pending = []
        for start in range(0, len(paths), batch_size):
            batch = [
                (Path(p), pool.submit(decode_rgb, {"path": str(p)}, str(Path(p)), side=side))
                for p in paths[start : start + batch_size]
            ]
            yield from _scored_batch(pending, score, captions, caption, threshold, bar)
            pending = batch
        yield from _scored_batch(pending, score, captions, caption, threshold, bar)


def _scored_batch(batch: list, score, captions: dict[str, str], caption: str, threshold, bar) -> list[dict]:
    """The rows of ``batch`` (each a path and the future of its decoded image), scored."""
    rows, images, texts = [], [], []
    for path, decoding in batch:
        row = {"path": str(path), "error": ""}
        try:
            images.append(decoding.result())
        except DataError as err:
            row["error"] = str(err)
        else:
            texts.append(captions.get(str(path), captions.get(path.name, caption)))
        rows.append(row)
        bar.update()
    return scored(rows, images, texts, score, threshold)


def scored(rows: list[dict], images: list, texts: list[str], score, threshold: float | None) -> list[dict]:
    """``rows`` (``path`` and ``error`` each) with the scores of ``score`` (:func:`aigid.serving.scorer.scorer`)
    on their readable files: ``images`` (encoded bytes or images decoded by :func:`aigid.core.data.decode_rgb`) and
    their captions ``texts``, one per row without an error, in order."""
    if images:
        good = [r for r in rows if not r["error"]]
        for row, scores in zip(good, score(images, texts, threshold)):
            row.update(scores)
    return rows


def threshold_from(spec: str) -> float:
    """The operating-point threshold in an evaluate metrics file: ``FILE`` (the retrained model's entry) or
    ``FILE:MODEL`` (``base`` or ``retrained``)."""
    path, _, name = spec.rpartition(":")
    if name not in ("base", "retrained"):
        path, name = spec, "retrained"
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read an evaluate metrics file ({err})") from None
    try:
        return float(metrics[name]["operating_point"]["threshold"])
    except (KeyError, TypeError):
        raise DataError(f"{path}: no {name}.operating_point.threshold (written by `aigid evaluate`)") from None


def read_captions(path: Path) -> dict[str, str]:
    """A ``path,caption`` table (CSV or .xlsx) as {path: caption}; paths as given on the command line or bare
    file names. A path listed twice is an error naming both rows."""
    from aigid.sources.tables import duplicates, read_table  # pandas: imported only when there is a table to read

    frame = read_table(path, ("path", "caption"))
    keys = list(frame["path"])
    if found := duplicates(keys, path, "path"):
        raise DataError(next(iter(found.values())))
    return dict(zip(keys, frame["caption"]))


def render(rows: list[dict], fmt: str, fields: list[str]) -> str:
    """CSV or JSON with ``fields`` in every row (empty, or null in JSON, where an input was not scored)."""
    buf = io.StringIO()
    write_rows(iter(rows), buf, fmt, fields)
    return buf.getvalue()


def write_rows(rows: Iterator[dict], out, fmt: str, fields: list[str]) -> int:
    """Write ``rows`` to ``out`` (anything with ``write(text)``) as :func:`render` renders them, one row at a
    time; return how many there were."""
    if fmt == "json":  # json.dumps(list, indent=2), a row at a time
        n = 0
        for n, row in enumerate(rows, 1):
            item = json.dumps({k: row.get(k) for k in fields}, indent=2).replace("\n", "\n  ")
            out.write(("[\n  " if n == 1 else ",\n  ") + item)
        out.write("\n]\n" if n else "[]\n")
        return n
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow(row)
        n += 1
    return n


class _Echo:
    """Standard output as a stream for :func:`write_rows`, through click (which tests capture)."""

    def write(self, text: str) -> None:
        click.echo(text, nl=False)


@click.command(name="detect")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--model",
    "model_spec",
    help="Model directory written by train or retrain, a portable one written by export (scored without "
    "torch), or a registered model from the MLflow store: models:/<name>@<alias> (e.g. "
    "models:/aigid-detector@candidate) or models:/<name>/<version>. Default: models/portable on a CPU, "
    "models/retrained where a GPU is present, for --precision bf16 or without models/portable (stderr "
    "says which).",
)
@click.option("--caption", default="", help="One caption for every image (default: none).")
@click.option(
    "--captions",
    "captions_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV with columns path,caption (path as given or a bare file name).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    help="One cut instead of the model's own thresholds: the verdict is ai when P(AI) is at least this, else "
    "real (no unsure). Default: the model's verdict (ai at or above its operating point, real below its lower "
    "threshold, unsure between), fitted on validation and stored with the model.",
)
@click.option(
    "--threshold-from",
    "threshold_spec",
    metavar="FILE[:MODEL]",
    help="One cut (as --threshold) at a model's operating point as evaluate reports it (at most "
    "verdict.target_fpr of real validation images called AI), read from FILE (e.g. metrics/evaluate.json) "
    "for MODEL (retrained (default) or base).",
)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="auto: bf16 on a GPU, float32 on the CPU; bf16: also on the CPU (about 2x faster on CPUs with "
    "bf16 instructions, scores within a few hundredths); fp32: float32 everywhere. A portable model "
    "runs in float32.",
)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file (default: standard output).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (it is shown on stderr only when it is a terminal).")
@click.pass_context
@clean_errors
def command(
    ctx, inputs, model_spec, caption, captions_file, threshold, threshold_spec, batch_size, precision, fmt, out, quiet
) -> None:
    """Score image files, folders or globs: P(AI), the generator and every class probability.

    Unreadable files get a row with the reason in `error`; the others are still scored. Exit status: 0 every
    input scored; 1 nothing scored (bad --model, --out, --captions or --threshold-from, no image found, no
    input readable); 2 a usage error; 3 some inputs could not be read.
    """
    if out is not None and not out.parent.is_dir():
        raise click.ClickException(f"--out {out}: the folder {out.parent} does not exist")
    if threshold_spec:
        if threshold is not None:
            raise click.UsageError("give --threshold or --threshold-from, not both")
        threshold = threshold_from(threshold_spec)
    captions = read_captions(captions_file) if captions_file else None
    model_dir, why = choose_model(model_spec, precision)
    if why:
        click.echo(f"scoring with {model_dir} ({why}; --model chooses another)", err=True)
    for notice in Scoring.load(model_dir).notices(model_spec or str(model_dir)):
        click.echo(f"note: {notice}", err=True)
    paths = expand(list(inputs))
    if not paths:
        raise click.ClickException(
            f"no image files in {', '.join(inputs)} (none of the formats Pillow opens: .jpg, .png, .webp, ...)"
        )
    rows = iter_detect(
        paths,
        model_dir,
        captions,
        caption=caption,
        threshold=threshold,
        batch_size=batch_size,
        progress=not quiet and sys.stderr.isatty(),
        precision=precision,
    )
    failed = 0

    def counted():
        nonlocal failed
        for row in rows:
            failed += bool(row["error"])
            yield row

    fields = columns(json.loads((model_dir / "config.json").read_text())["class_names"])
    with out.open("w") if out else contextlib.nullcontext(_Echo()) as stream:
        total = write_rows(counted(), stream, fmt, fields)
    if failed == total:
        raise click.ClickException(f"none of the {total} input(s) could be scored (the error column says why)")
    if failed:
        click.echo(f"{failed} of {total} input(s) could not be read (the error column says why)", err=True)
        ctx.exit(SOME_FAILED)
