"""Command line: one command per pipeline stage. Each parses options, loads params, calls one function."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import click

from .config import PRECISIONS, ParamsError, load_params

PARAMS = click.option("--params", "params_file", type=click.Path(dir_okay=False, path_type=Path),
                      default="params.yaml", show_default=True, help="Parameters file.")


def _path(**kw):
    return click.Path(path_type=Path, **kw)


def write_json(path: Path, obj) -> None:
    """Write through a temporary file and rename, so a metrics file is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _fail_cleanly(fn):
    """Known failures (bad data, unreachable tracking store) end with one clear line, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .data import DataError
        from .tracking import TrackingError

        try:
            return fn(*args, **kwargs)
        except (DataError, TrackingError) as err:
            raise click.ClickException(str(err)) from None

    return wrapper


def _load(params_file: Path):
    try:
        return load_params(params_file)
    except ParamsError as err:
        raise click.ClickException(str(err)) from None


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Detect AI-generated images and name the generator (BERT caption + CLIP image, two heads)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Per-shard and per-weight progress bars drown the stage logs in DVC's output.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()  # one handler (ours) prints each message once
    transformers.utils.logging.enable_propagation()
    if not verbose:
        transformers.utils.logging.set_verbosity_warning()
    from .runtime import configure

    configure()


@main.command()
@PARAMS
@click.option("--out", type=_path(), default="data/prepared", show_default=True,
              help="Directory for the checked dataset (Arrow, save_to_disk layout).")
@click.option("--metrics", "metrics_file", type=_path(), default="metrics/prepare.json", show_default=True,
              help="Metrics file: rows and captions per split, shared captions, bytes per sample.")
@click.option("--report", type=_path(), default="metrics/quarantine.csv", show_default=True,
              help="CSV of every skipped row (prepare.on_bad: skip) and every duplicated image, with the reason.")
def prepare(params_file: Path, out: Path, metrics_file: Path, report: Path) -> None:
    """Read prepare.source, check every row, store it.

    The source is `demo`, a Hugging Face dataset id, or a local directory in one of the layouts arrow
    (save_to_disk), parquet, competition (captions table + one folder per source) or folders (one folder
    per class); see prepare.layout. A bad row stops the stage with its split, row, file and reason, or,
    with prepare.on_bad: skip, is left out and listed in REPORT.
    """
    from .data import DataError
    from .prepare import prepare as run

    p = _load(params_file)
    try:
        metrics = run(p.prepare, p.seed, out, report)
    except DataError as err:
        raise click.ClickException(str(err)) from None
    write_json(metrics_file, metrics)


@main.command()
@PARAMS
@click.option("--data", type=_path(exists=True), default="data/prepared", show_default=True,
              help="Prepared dataset; its train captions train the demo tokenizer.")
@click.option("--out", type=_path(), default="models/encoders", show_default=True,
              help="Directory for the text/ and vision/ encoders.")
def encoders(params_file: Path, data: Path, out: Path) -> None:
    """Write the starting text and vision encoders to OUT/text and OUT/vision.

    encoders.text / encoders.vision may be hub names or local directories (loaded with from_pretrained and
    saved again, pinning them), or `demo` (small encoders built from configs, for offline runs).
    """
    from .data import open_dataset
    from .encoders import build_demo_encoders, snapshot_encoders

    p = _load(params_file)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    demo = (p.encoders.text == "demo", p.encoders.vision == "demo")
    if any(demo) and not all(demo):
        raise click.ClickException("params.yaml: encoders.text and encoders.vision must both be 'demo' or neither")
    if all(demo):
        build_demo_encoders(open_dataset(data)["train"]["Caption"], p.encoders, tmp, p.seed)
    else:
        try:
            snapshot_encoders(p.encoders, tmp)
        except RuntimeError as err:
            raise click.ClickException(str(err)) from None
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@main.command()
@PARAMS
@click.option("--data", type=_path(exists=True), default="data/prepared", show_default=True,
              help="Prepared dataset: every split is encoded.")
@click.option("--encoders", "encoders_dir", type=_path(exists=True), default="models/encoders",
              show_default=True, help="Starting encoders written by the encoders stage.")
@click.option("--out", type=_path(), default="data/features", show_default=True,
              help="Directory for the cached features (Arrow, one row per prepared row).")
@_fail_cleanly
def features(params_file: Path, data: Path, encoders_dir: Path, out: Path) -> None:
    """Cache the starting encoders' text and image features (train.freeze_encoders: true).

    With train.freeze_encoders: false, OUT only records that no features were computed.
    """
    from .features import compute_features

    p = _load(params_file)
    compute_features(p, data, encoders_dir, out)


FEATURES_OPTION = click.option("--features", "features_dir", type=_path(), default="data/features",
                               show_default=True, help="Cached encoder features (used with train.freeze_encoders).")


def _train_command(stage: str, pseudo: bool):
    @PARAMS
    @click.option("--data", type=_path(exists=True), default="data/prepared", show_default=True,
                  help="Prepared dataset (train and validation splits).")
    @click.option("--encoders", "encoders_dir", type=_path(exists=True), default="models/encoders",
                  show_default=True, help="Starting encoders written by the encoders stage.")
    @click.option("--out", type=_path(), default=f"models/{'retrained' if pseudo else 'base'}", show_default=True,
                  help="Directory for the best model (self-contained: weights, configs, tokenizer, processor).")
    @click.option("--metrics", "metrics_file", type=_path(), default=f"metrics/{stage}.json", show_default=True,
                  help="Validation metrics of the best checkpoint.")
    @click.option("--history", "history_file", type=_path(), default=f"metrics/{stage}_history.json",
                  show_default=True, help="Per-epoch validation metrics (a DVC plot).")
    @FEATURES_OPTION
    @_fail_cleanly
    def command(params_file, data, encoders_dir, out, metrics_file, history_file, features_dir, pseudo_dir=None):
        from .tracking import is_main_process
        from .train import fit

        p = _load(params_file)
        try:
            result = fit(p, data, encoders_dir, out, stage=stage, pseudo_dir=pseudo_dir, features_dir=features_dir)
        except ParamsError as err:  # train.batch_size that does not divide over the launched processes
            raise click.ClickException(str(err)) from None
        if is_main_process():  # under torchrun every rank gets here; rank 0 writes
            write_json(metrics_file, result["metrics"])
            write_json(history_file, result["history"])

    return command


train = main.command(name="train", help="Train the detector on the prepared train split (Trainer; best "
                     "checkpoint by weighted F1 on Task A).")(_train_command("train", pseudo=False))
retrain = main.command(name="retrain", help="Train a fresh detector from the same encoders on the original "
                       "plus pseudo-labelled data.")(
    click.option("--pseudo", "pseudo_dir", type=_path(exists=True), default="data/pseudolabel", show_default=True,
                 help="Train/validation additions written by the pseudolabel stage.")(
        _train_command("retrain", pseudo=True)))


@main.command()
@PARAMS
@click.option("--model", "model_dir", type=_path(exists=True), default="models/base", show_default=True,
              help="Model directory that labels the pool.")
@click.option("--data", type=_path(exists=True), default="data/prepared", show_default=True,
              help="Prepared dataset holding the pool split.")
@click.option("--out", type=_path(), default="data/pseudolabel", show_default=True,
              help="Directory for the kept samples, split into train/validation additions.")
@click.option("--metrics", "metrics_file", type=_path(), default="metrics/pseudolabel.json", show_default=True,
              help="Counts kept, and how many pseudo-labels are right where the pool's labels are known.")
@FEATURES_OPTION
@_fail_cleanly
def pseudolabel(params_file, model_dir, data, out, metrics_file, features_dir) -> None:
    """Label pseudolabel.pool with MODEL; keep samples whose Task A and Task B confidences exceed `threshold`."""
    import mlflow

    from .pseudolabel import pseudolabel as run
    from .tracking import stage_run

    p = _load(params_file)
    q = p.pseudolabel
    with stage_run("pseudolabel", p, ("threshold", "seed", "pseudolabel", "train.num_workers",
                                      "train.freeze_encoders", "inference", "mlflow")):
        metrics = run(model_dir, data, out, q.pool, p.threshold, q.validation_fraction, q.batch_size, p.seed,
                      p.train.num_workers, features_dir if p.train.freeze_encoders else None,
                      p.inference.precision)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "threshold"})
    write_json(metrics_file, metrics)


@main.command()
@PARAMS
@click.option("--base", "base_dir", type=_path(exists=True), default="models/base", show_default=True,
              help="Model written by train.")
@click.option("--retrained", "retrained_dir", type=_path(exists=True), default="models/retrained",
              show_default=True, help="Model written by retrain; logged to MLflow and registered.")
@click.option("--data", type=_path(exists=True), default="data/prepared", show_default=True,
              help="Prepared dataset holding the labeled test split (and validation, for the operating point).")
@click.option("--metrics", "metrics_file", type=_path(), default="metrics/evaluate.json", show_default=True,
              help="Scores of both models on the test split.")
@click.option("--plots", "plots_dir", type=_path(), default="metrics/plots", show_default=True,
              help="Directory for plot rows: confusion matrices, ROC and precision-recall curves, robustness.")
@_fail_cleanly
def evaluate(params_file, base_dir, retrained_dir, data, metrics_file, plots_dir) -> None:
    """Score the base and retrained models on the test split: both tasks, balanced metrics, per generator,
    ROC/PR, the operating point at evaluate.target_fpr, without captions, under the robustness grid.

    The retrained model is then logged to this stage's MLflow run (with its test metrics) and registered as
    a new version of mlflow.registered_model, labelling at its operating-point threshold.
    """
    import mlflow

    from .config import flatten
    from .data import open_dataset
    from .evaluate import evaluate as run
    from .registry import log_detector
    from .tracking import stage_run

    p = _load(params_file)
    with stage_run("evaluate", p, ("evaluate", "pseudolabel.pool", "train.num_workers", "inference", "mlflow")):
        metrics, plots = run({"base": base_dir, "retrained": retrained_dir}, data, p.evaluate,
                             contaminated=p.pseudolabel.pool == "test", num_workers=p.train.num_workers,
                             precision=p.inference.precision)
        for model in ("base", "retrained"):
            flat = flatten(metrics[model])
            mlflow.log_metrics({f"{model}_{k.replace('.', '_')}": v for k, v in flat.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.set_tag("contaminated", str(metrics["contaminated"]).lower())
        test = open_dataset(data)["test"]
        log_detector(retrained_dir, p.mlflow.registered_model, metrics["retrained"]["operating_point"]["threshold"],
                     test[0]["Image"]["bytes"], test[0]["Caption"])
    for name, rows in plots.items():
        write_json(plots_dir / f"{name}.json", rows)
    write_json(metrics_file, metrics)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "model_spec", default="models/retrained", show_default=True,
              help="Model directory written by train or retrain, or a registered model: "
                   "models:/<name>/<version|latest> (e.g. models:/aigid-detector/latest), from the MLflow store.")
@click.option("--caption", default="", help="One caption for every image (default: none).")
@click.option("--captions", "captions_file", type=_path(exists=True, dir_okay=False),
              help="CSV with columns path,caption (path as given or a bare file name).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Call an image AI when P(AI) is at least this.")
@click.option("--threshold-from", "threshold_spec", metavar="FILE[:MODEL]",
              help="Use the operating point evaluate chose instead of --threshold: the threshold with at most "
                   "evaluate.target_fpr false positives on real validation images, read from FILE (e.g. "
                   "metrics/evaluate.json) for MODEL (retrained (default) or base).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 on a GPU, float32 on the CPU; bf16: also on the CPU (about 2x faster on CPUs with "
                   "bf16 instructions, scores within a few hundredths); fp32: float32 everywhere.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--out", type=_path(dir_okay=False), help="Output file (default: standard output).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (it is shown on stderr only when it is a terminal).")
@click.pass_context
@_fail_cleanly
def detect(ctx, inputs, model_spec, caption, captions_file, threshold, threshold_spec, batch_size, precision, fmt,
           out, quiet) -> None:
    """Score image files, folders or globs: P(AI), the generator and every class probability.

    Unreadable files get a row with the reason in `error`; the others are still scored.
    """
    import sys

    from .detect import detect as run
    from .detect import expand, read_captions, render, resolve_model, threshold_from

    if threshold_spec:
        if ctx.get_parameter_source("threshold") == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError("give --threshold or --threshold-from, not both")
        threshold = threshold_from(threshold_spec)
    captions = read_captions(captions_file) if captions_file else None
    progress = not quiet and sys.stderr.isatty()
    rows = run(expand(list(inputs)), resolve_model(model_spec), captions, caption, threshold, batch_size, progress,
               precision)
    text = render(rows, fmt)
    if out:
        out.write_text(text)
    else:
        click.echo(text, nl=False)


if __name__ == "__main__":
    main()
