"""The pipeline contract: dvc.yaml says exactly what each stage depends on, and nothing is listed twice.

- code: each stage's `src/aigid/*.py` deps are the import closure of its command (derived here from the source);
- params: each stage's `params:` equal the PARAMS its module declares (and reads: see aigid.config.Scoped);
- paths: each stage's command passes its paths as the defaults of its options, and every input it reads or
  output it writes is a declared dep or out;
- configs: every shipped config file is a complete, valid params file;
- installs: every install line takes torch and torchvision at the versions requirements.lock pins.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from aigid import cli
from aigid.cli import COMMANDS
from aigid.config import Params, load_params
from conftest import REPO

SRC = REPO / "src"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]


def _module_file(name: str) -> Path | None:
    file = SRC / (name.replace(".", "/") + ".py")
    return file if file.is_file() else None


def _imports(name: str, tree: ast.AST) -> set[str]:
    """The aigid modules ``name`` imports, anywhere in its body (imports inside functions count)."""
    found: set[str] = set()
    package = name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "aigid"}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(filter(None, (base, node.module)))
            if target.split(".")[0] != "aigid":
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if _module_file(f"{target}.{a.name}")}
    return found


def import_closure(*modules: str) -> set[str]:
    """Every aigid source file that importing ``modules`` can load, as repository paths."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        file = _module_file(name)
        if name in seen or file is None:
            continue
        seen.add(name)
        todo += _imports(name, ast.parse(file.read_text()))
    return {_module_file(m).relative_to(REPO).as_posix() for m in seen}


def stage_code(stage: str) -> set[str]:
    """What `aigid <stage>` runs: the CLI, then the stage's module and whatever it imports."""
    return import_closure("aigid.cli", COMMANDS[stage])


def declared_code(stage: str) -> set[str]:
    return {d for d in STAGES[stage].get("deps", []) if d.startswith("src/")}


def test_the_command_line_profiles_exactly_the_pipeline_stages():
    assert cli.STAGES == tuple(STAGES)  # the compute profile is set before each of them imports torch


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_the_import_closure_of_the_stage(stage):
    expected, listed = stage_code(stage), declared_code(stage)
    assert listed == expected, f"dvc.yaml stage {stage}: code deps should be exactly\n" + "\n".join(
        f"      - {d}" for d in sorted(expected)
    )


def test_the_closure_follows_imports_inside_functions_and_relative_imports():
    assert "src/aigid/demo.py" in stage_code("prepare")  # imported inside prepare()
    assert "src/aigid/registry.py" in stage_code("evaluate")
    for stage in ("prepare", "encoders", "features", "train", "pseudolabel", "retrain"):
        assert "src/aigid/detect.py" not in stage_code(stage)
    train = stage_code("train")
    assert {"src/aigid/model.py", "src/aigid/data.py"} <= train
    assert not train & {
        "src/aigid/registry.py",
        "src/aigid/evaluate.py",
        "src/aigid/sources.py",
        "src/aigid/demo.py",
        "src/aigid/prepare.py",
    }


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_are_the_keys_the_stage_module_declares(stage):
    module = importlib.import_module(COMMANDS[stage])
    assert sorted(STAGES[stage].get("params", [])) == sorted(module.PARAMS)


def _cmd_options(stage: str) -> dict[str, str]:
    words = shlex.split(STAGES[stage]["cmd"])
    assert words[:2] == ["aigid", stage]
    return {words[i][2:]: words[i + 1] for i in range(2, len(words), 2)}


def _entries(items) -> set[str]:
    return {next(iter(i)) if isinstance(i, dict) else i for i in items or []}


@pytest.mark.parametrize("stage", list(STAGES))
def test_command_paths_are_the_option_defaults_and_declared_deps_or_outs(stage):
    module = importlib.import_module(COMMANDS[stage])
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(module.Paths)}
    options = _cmd_options(stage)
    assert options == {name: str(f.default) for name, f in fields.items()}
    s = STAGES[stage]
    deps = set(s.get("deps", []))
    outs = _entries(s.get("outs")) | _entries(s.get("metrics")) | _entries(s.get("plots"))
    for name, f in fields.items():
        where = deps if f.metadata["exists"] else outs
        # An input is either read (exists=True) or an output of an earlier stage read when needed (features).
        assert options[name] in where or options[name] in deps, f"{stage} --{name} {options[name]} is not declared"


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in ("class_aliases", "captions"):
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.mark.parametrize(
    "config", ["params.yaml", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*.yaml"))]
)
def test_every_shipped_config_is_complete_and_valid(config):
    params = load_params(REPO / config)
    assert isinstance(params, Params)
    assert _keys(yaml.safe_load((REPO / config).read_text())) == _keys(
        yaml.safe_load((REPO / "params.yaml").read_text())
    )


def test_every_install_line_takes_torch_and_torchvision_at_the_lock_pins():
    """torch and torchvision are installed first, by hand, before the lock (an unpinned torch pulls the newest
    CUDA build): the README's two commands, .ci/run and the GitHub workflow must install the versions
    requirements.lock pins, and the lock must pin both."""
    import re

    pins = dict(
        line.split("==")
        for line in (REPO / "requirements.lock").read_text().split()
        if line.split("==")[0] in ("torch", "torchvision")
    )
    assert set(pins) == {"torch", "torchvision"}
    expected = f"pip install torch=={pins['torch']} torchvision=={pins['torchvision']}"
    places = {"README.md": 2, ".ci/run": 1, ".github/workflows/ci.yml": 1}
    for name, count in places.items():
        text = (REPO / name).read_text()
        lines = [m.group(0) for m in re.finditer(r"pip install (-q )?torch\S*( torchvision\S*)?", text)]
        assert len(lines) == count, f"{name}: {lines}"
        assert all(line.replace("-q ", "") == expected for line in lines), f"{name}: {lines}, expected {expected}"
