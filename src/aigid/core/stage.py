"""What every stage shares: its paths as command options, its view of the params, one-line errors.

A stage module declares ``PARAMS`` (the params keys it reads: the same list as its ``params:`` in dvc.yaml, a
test compares them), a frozen dataclass of its paths (defaults = the paths in dvc.yaml), and
``run(params, paths) -> metrics``, which does the work and writes every output. :func:`command` turns that
into its click command: one option per path, ``--params``, and nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import click

from aigid.core.errors import DataError, ParamsError, TrackingError, os_error_message

log = logging.getLogger(__name__)


def path(default: str, help: str, exists: bool = False):
    """A path field of a stage's paths: its option default (as in dvc.yaml), help, and whether it must exist."""
    return dataclasses.field(default=Path(default), metadata={"help": help, "exists": exists})


def load(params_file: Path, keys: tuple[str, ...]):
    """The params of ``params_file`` as the stage that declares ``keys`` sees them (:class:`aigid.core.config.View`);
    a bad file is one clean line."""
    from aigid.core.config import load_params, view  # here: detect uses this module's clean_errors, not the params

    try:
        return view(load_params(params_file), keys)
    except ParamsError as err:
        raise click.ClickException(str(err)) from None


def clean_errors(fn):
    """Known failures (bad data or params, unusable tracking store) end with one line, not a traceback; so does
    an error of the operating system (a full disk, a read-only or missing folder, no permission, a file where a
    folder is expected), naming the command and the path (`aigid -v` logs its traceback). Any other exception is
    a bug and keeps its traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DataError, ParamsError, TrackingError) as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:
            log.debug("%s failed", click.get_current_context().info_name, exc_info=True)
            raise click.ClickException(f"{click.get_current_context().info_name}: {os_error_message(err)}") from None

    return wrapper


def quiet_transformers() -> None:
    """transformers logs through the root logger's handler (each message once, at its level: warnings, or
    everything with `aigid -v`) and shows no per-weight progress bars, which drown the stage logs."""
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        transformers.utils.logging.set_verbosity_warning()


def command(name: str, run, paths_cls, keys: tuple[str, ...]) -> click.Command:
    """The click command of a stage: parse the paths, load the params, call ``run``."""

    def callback(params_file: Path, **options):
        run(load(params_file, keys), paths_cls(**options))

    options = [
        click.option(
            "--params",
            "params_file",
            type=click.Path(dir_okay=False, path_type=Path),
            default="params.yaml",
            show_default=True,
            help="Parameters file.",
        )
    ]
    for f in dataclasses.fields(paths_cls):
        meta = f.metadata
        options.append(
            click.option(
                f"--{f.name.replace('_', '-')}",
                f.name,
                show_default=True,
                help=meta["help"],
                default=str(f.default),
                type=click.Path(path_type=Path, exists=meta["exists"]),
            )
        )
    cmd = clean_errors(callback)
    for opt in reversed(options):
        cmd = opt(cmd)
    return click.command(name=name, help=run.__doc__)(cmd)
