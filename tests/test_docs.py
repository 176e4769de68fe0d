"""The docs name only what exists: every params key they write as `group.key`, every `aigid` command and option
they show, and every key an experiment sets with `dvc exp run -S`. A renamed key or option fails here, not in a
reader's shell."""

from __future__ import annotations

import importlib
import json
import re
import shlex

import click
import pytest
import yaml

from aigid.cli import main
from helpers import REPO

DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
# Dotted names in the docs that are not params although they start with a params group: files (`model.onnx`),
# Python objects (`mlflow.pyfunc.spark_udf`) and keys of the committed metrics and reports are recognised below;
# what is left are names another tool defines.
OTHER_TOOLS = {"mlflow.experimentKind"}
FILE_SUFFIXES = {".json", ".parquet", ".onnx", ".data", ".safetensors", ".db", ".csv", ".yaml", ".md", ".lock"}
SPAN = re.compile(r"`([a-z_]+(?:\.[A-Za-z0-9_<>*-]+)+)(?:[=:][^`]*)?`")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _text(path) -> str:
    return path.read_text(encoding="utf-8")


def _json_paths() -> set[tuple[str, ...]]:
    """Every run of nested keys in the committed metrics and reports (a name a doc may cite)."""
    found: set[tuple[str, ...]] = set()

    def walk(node, trail):
        if isinstance(node, dict):
            for key, value in node.items():
                path = (*trail, str(key))
                for start in range(len(path)):
                    found.add(path[start:])
                walk(value, path)

    for path in [*REPO.glob("metrics/*.json"), *REPO.glob("reports/*.json")]:
        walk(json.loads(path.read_text()), ())
    return found


def _in_params(parts: list[str]) -> bool:
    node = PARAMS
    for part in parts:
        if not isinstance(node, dict) or part.startswith("<") or part == "*":
            return True  # a list's or a placeholder's inside: nothing more to check
        if part not in node:
            return False
        node = node[part]
    return True


def _importable(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def params_spans() -> list[tuple[str, str]]:
    """(doc, name) for every backticked dotted name whose first part is a params group."""
    return sorted(
        {
            (path.name, m.group(1))
            for path in DOCS
            for m in SPAN.finditer(_text(path))
            if m.group(1).split(".")[0] in PARAMS
        }
    )


def test_every_params_key_the_docs_name_exists():
    json_paths = _json_paths()
    missing = []
    for doc, name in params_spans():
        parts = name.split(".")
        if _in_params(parts) or name in OTHER_TOOLS or "." + parts[-1] in FILE_SUFFIXES:
            continue
        if tuple(parts) in json_paths or _importable(name):
            continue
        missing.append(f"{doc}: `{name}`")
    assert not missing, "docs name params keys that params.yaml does not have:\n" + "\n".join(missing)


def _shell_lines(block: str) -> list[str]:
    """A code block's command lines, continuations joined, prompts and comments dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [re.sub(r"^\$ ", "", line).split(" #")[0].strip() for line in lines]


def _commands(text: str) -> list[list[str]]:
    """Every `aigid ...` and `dvc exp run ...` invocation in shell code blocks and inline code, as tokens."""
    found = []
    text = text.replace("$(which aigid)", "aigid")
    sources = [b for lang, b in FENCE.findall(text) if lang in ("", "bash", "sh", "console", "shell")]
    sources += re.findall(r"`((?:aigid|dvc exp run) [^`]+)`", text)
    for source in sources:
        for line in _shell_lines(source):
            for part in re.split(r"&&|\|\||;|\|", line):
                try:
                    tokens = shlex.split(part)
                except ValueError:
                    tokens = part.split()
                for start, token in enumerate(tokens):
                    value = start and tokens[start - 1].startswith("-") and "=" not in tokens[start - 1]
                    if (token == "aigid" and not value) or tokens[start : start + 3] == ["dvc", "exp", "run"]:
                        found.append(tokens[start:])
                        break
    return found


def _aigid_problem(tokens: list[str]) -> str | None:
    if len(tokens) < 2 or tokens[1].startswith(("-", "<")) or tokens[1] == "...":  # a placeholder
        return None
    command = main.get_command(click.Context(main), tokens[1])
    if command is None:
        return f"`aigid {tokens[1]}` is not a command"
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    options |= {"--help"}
    for token in tokens[2:]:
        if token.startswith("-") and token not in ("-", "--") and not re.fullmatch(r"-\d.*", token):
            if token.split("=")[0] not in options:
                return f"`aigid {tokens[1]}` has no option {token.split('=')[0]}"
    return None


def _exp_problem(tokens: list[str]) -> str | None:
    for flag, value in zip(tokens, tokens[1:]):
        if flag in ("-S", "--set-param"):
            name = value.split("=")[0]
            if not _in_params(name.split(".")):
                return f"`dvc exp run -S {name}=...`: params.yaml has no {name}"
    return None


def test_every_command_and_option_the_docs_show_exists():
    problems = []
    for path in DOCS:
        for tokens in _commands(_text(path)):
            problem = _aigid_problem(tokens) if tokens[0] == "aigid" else _exp_problem(tokens)
            if problem:
                problems.append(f"{path.name}: {problem}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("`evaluate.jpeg_quality`", "`evaluate.jpeg_quality`"),
        ("```bash\naigid detect photo.jpg --no-such-option\n```", "no option --no-such-option"),
        ("```bash\naigid nosuch --out x\n```", "is not a command"),
        ("`dvc exp run -S train.no_such_key=3`", "params.yaml has no train.no_such_key"),
    ],
)
def test_the_checks_find_a_stale_name(text, problem, tmp_path, monkeypatch):
    doc = tmp_path / "stale.md"
    doc.write_text(text + "\n")
    monkeypatch.setitem(globals(), "DOCS", (doc,))
    test = (
        test_every_params_key_the_docs_name_exists
        if text.startswith("`evaluate")
        else test_every_command_and_option_the_docs_show_exists
    )
    with pytest.raises(AssertionError, match=re.escape(problem)):
        test()
