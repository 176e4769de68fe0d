"""Command line: `aigid <stage>` and `aigid detect`. This module only parses.

Each command lives with the code it runs (a stage's module defines ``command``, see :mod:`aigid.stage`) and is
imported only when it is called: `aigid train` loads the train stage's modules and nothing else, which keeps
the commands quick to start and each stage's code dependencies in dvc.yaml exactly what it imports.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys

import click

# command name -> module defining `command`; the pipeline stages in dvc.yaml's order, then the tools.
COMMANDS = {name: f"aigid.{name}" for name in ("prepare", "encoders", "features", "train", "pseudolabel", "retrain",
                                               "evaluate", "detect", "promote")} | {"register": "aigid.registry"}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (click's documented lazy-loading pattern)."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        # What a command imports (torch, transformers, their modules, classes and functions) lives as long as
        # the process. Collecting while importing walks those objects again and again, and so does the last
        # collection at exit: seconds of every command's start and end (`aigid detect one.jpg`: about 2.5 of
        # 6 s). So collection is off while the command imports, and what the import made is frozen out of
        # later collections (gc.freeze); collection is on again for the command's own work.
        gc.disable()
        try:
            return importlib.import_module(COMMANDS[name]).command
        finally:
            gc.freeze()
            gc.enable()


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Detect AI-generated images and name the generator (BERT caption + CLIP image, two heads)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Per-shard and per-weight progress bars drown the stage logs in DVC's output. `datasets` reads its switch
    # when a stage imports it; detect never does (importing it costs a one-image run half a second).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()  # one handler (ours) prints each message once
    transformers.utils.logging.enable_propagation()
    if not verbose:
        transformers.utils.logging.set_verbosity_warning()


if __name__ == "__main__":
    main()
