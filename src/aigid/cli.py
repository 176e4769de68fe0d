"""Command line: `aigid <stage>` and `aigid detect`. This module only parses.

Each command lives with the code it runs (a stage's module defines ``command``, see :mod:`aigid.core.stage`) and is
imported only when it is called: `aigid train` loads the train stage's modules and nothing else, which keeps
the commands quick to start and each stage's code dependencies in dvc.yaml exactly what it imports.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from aigid.core import compute
from aigid.core.stage import quiet_transformers

# The pipeline stages in dvc.yaml's order; each runs under params.yaml's compute profile (aigid.core.compute).
STAGES = ("prepare", "encoders", "features", "train", "pseudolabel", "retrain", "evaluate", "export")
# command name -> module defining `command`: the stages, then the tools.
COMMANDS = {name: f"aigid.stages.{name}" for name in STAGES} | {
    name: f"aigid.tools.{name.replace('-', '_')}" for name in ("detect", "app", "promote", "register", "score-table")
}
# Commands that import transformers only where they need it (detect and app on a portable model never do;
# score-table loads the model on Spark's executors), and call quiet_transformers there; for every other command the
# group does it.
OWN_IMPORTS = frozenset({"detect", "app", "score-table"})


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (click's documented lazy-loading pattern)."""

    invoked: str | None = None  # the command this process ran

    def list_commands(self, ctx):
        return list(COMMANDS)

    def resolve_command(self, ctx, args):
        if args and args[0] in STAGES:  # before the stage's module imports torch, which reads the profile once
            compute.apply(compute.params_file(args[1:]))
        name, command, rest = super().resolve_command(ctx, args)
        self.invoked = name
        return name, command, rest

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name]).command


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Detect AI-generated images and name the generator (BERT caption + CLIP image, two heads)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Per-shard and per-weight progress bars drown the stage logs in DVC's output. `datasets` reads its switch
    # when a stage imports it; detect never does (it would slow a one-image run down).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if main.invoked not in OWN_IMPORTS:
        quiet_transformers()


if __name__ == "__main__":
    main()
