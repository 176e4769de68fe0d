"""The `aigid` executable (aigid.cli): a command is imported on first use with garbage collection off, and
`detect` ends without the interpreter's teardown."""

import csv
import io

from PIL import Image

from aigid.cli import main
from helpers import save_tiny_model


def test_commands_import_without_collection_and_run_with_it():
    """`aigid` imports a command with garbage collection off and freezes what the import made; the command itself
    runs with collection on (a stage that ran with it off would never free reference cycles)."""
    import gc

    import click

    before = gc.get_freeze_count()
    ctx = click.Context(main)
    try:
        assert main.get_command(ctx, "promote") is not None
        assert gc.isenabled()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def test_detect_exits_without_teardown_after_the_exit_handlers_and_other_commands_tear_down(tmp_path):
    """The `aigid` executable ends `detect` with its output flushed, its exit status and the exit handlers run,
    but without the interpreter's teardown (a finaliser the teardown would call is not called); any other
    command exits normally."""
    import subprocess
    import sys

    save_tiny_model(tmp_path / "model")
    Image.new("RGB", (20, 20), "red").save(tmp_path / "red.png")
    code = """if True:
        import atexit, os, sys
        class Witness:
            def __del__(self, write=os.write):  # the module's globals are gone by the time the teardown calls it
                write(2, b"teardown\\n")
        witness = Witness()
        atexit.register(lambda: sys.stderr.write("exit handlers\\n"))
        sys.argv = ["aigid", *sys.argv[1:]]
        from aigid.cli import run
        run()
    """

    def aigid(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)

    scored = aigid("detect", "--model", "model", "red.png", "missing.png")
    assert scored.returncode == 3, scored.stderr  # some inputs could not be read
    assert [r["path"] for r in csv.DictReader(io.StringIO(scored.stdout))] == ["red.png", "missing.png"]
    assert scored.stderr.splitlines()[-1] == "exit handlers"
    assert "teardown" not in scored.stderr
    listed = aigid("--help")
    assert listed.returncode == 0 and "detect" in listed.stdout
    assert listed.stderr.splitlines() == ["exit handlers", "teardown"]
