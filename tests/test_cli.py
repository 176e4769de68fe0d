"""The `aigid` executable (aigid.cli) and what its commands share (aigid.core.stage, aigid.core.files): an error of
the operating system is one line naming the command and the path, any other exception keeps its traceback, and an
output is replaced whole or not at all."""

from __future__ import annotations

import errno
import os

import click
import pytest
import yaml
from click.testing import CliRunner

from aigid.cli import main
from aigid.core.errors import DataError
from aigid.core.files import atomic_path, writing
from aigid.core.stage import clean_errors
from helpers import tiny_params_dict


def _command(exc: BaseException) -> click.Command:
    @click.command(name="somestage")
    @clean_errors
    def somestage():
        raise exc

    return somestage


@pytest.mark.parametrize(
    "exc, line",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "models/base"), "somestage: models/base: No space left"),
        (PermissionError(errno.EACCES, "Permission denied", "data/prepared"), "somestage: data/prepared: Permission"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "data/x", None, "data/y"), "somestage: data/x -> data/y: Read"),
        (OSError(errno.EIO, os.strerror(errno.EIO)), "somestage: Input/output error"),
    ],
)
def test_an_os_error_is_one_line_naming_the_command_and_the_path(exc, line):
    result = CliRunner().invoke(_command(exc))
    assert result.exit_code == 1 and result.output.startswith(f"Error: {line}"), result.output
    assert result.output.count("\n") == 1


@pytest.mark.parametrize("exc", [ZeroDivisionError("bug"), KeyError("bug"), RuntimeError("bug")])
def test_any_other_exception_keeps_its_traceback(exc):
    result = CliRunner().invoke(_command(exc))
    assert result.exit_code == 1 and result.exception is exc  # not turned into a clean message


def _tiny_project(root):
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    (root / "raw").mkdir()


def _prepare(root, *paths: str):
    args = ["prepare", "--params", str(root / "params.yaml"), "--raw", str(root / "raw")]
    for name, value in zip(("--out", "--report", "--quarantine"), paths):
        args += [name, str(root / value)]
    return CliRunner().invoke(main, args)


def test_a_stage_given_a_file_where_a_folder_is_expected_is_one_line_and_keeps_its_outputs(tmp_path):
    _tiny_project(tmp_path)
    assert _prepare(tmp_path, "out/prepared", "out/prepare.json", "out/q.csv").exit_code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    (tmp_path / "afile").write_text("")
    for paths in (("afile/prepared", "out/prepare.json"), ("out/prepared", "afile/sub/prepare.json", "out/q.csv")):
        result = _prepare(tmp_path, *paths)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output == f"Error: prepare: {tmp_path / 'afile'}: a file where a folder is expected\n"
        assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "out", "params.yaml", "raw"]  # no temporaries


class Stop(Exception):
    pass


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_writer_that_fails_leaves_the_previous_output_and_no_temporary(tmp_path, kind):
    out = tmp_path / "out"
    with atomic_path(out) as tmp:
        if kind == "file":
            tmp.write_text("old")
        else:
            tmp.mkdir()
            (tmp / "a").write_text("old")
    with pytest.raises(Stop), atomic_path(out) as tmp:
        if kind == "file":
            tmp.write_text("half")
        else:
            tmp.mkdir()
            (tmp / "a").write_text("half")
        raise Stop
    assert (out.read_text() if kind == "file" else (out / "a").read_text()) == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_path(out) as tmp:  # and a later writer still replaces it whole
        if kind == "file":
            tmp.write_text("new")
        else:
            tmp.mkdir()
            (tmp / "b").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert out.read_text() == "new" if kind == "file" else [p.name for p in out.iterdir()] == ["b"]


def test_an_os_error_without_a_file_name_is_given_the_output_it_stopped(tmp_path):
    with pytest.raises(OSError) as err, writing(tmp_path / "models/base"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a full disk raises when a file is closed
    assert err.value.filename == str(tmp_path / "models/base")
    with pytest.raises(OSError) as err, writing(tmp_path / "models/base"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "elsewhere")
    assert err.value.filename == "elsewhere"  # a named path stays
    with pytest.raises(RuntimeError), writing(tmp_path):  # a disk with room: a bug stays the bug it is
        raise RuntimeError("bug")
    with pytest.raises(DataError), writing(tmp_path):  # the project's own errors already name what is wrong
        raise DataError(f"x.png: cannot read image file: {os.strerror(errno.ENOSPC)}")
