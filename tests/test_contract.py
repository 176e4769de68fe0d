"""The pipeline contract: dvc.yaml says exactly what each stage depends on, and nothing is listed twice.

- code: each stage's `src/aigid` deps are the import closure of its command (derived here from the source), a
  package directory standing for its modules where every one of them is in the closure (so a directory dep
  never reruns a stage for code it does not run), single files otherwise;
- params: each stage's `params:` equal the PARAMS its module declares (and reads: see aigid.core.config.View);
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
from aigid.core.config import Params, load_params
from helpers import REPO

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


def modules_of(dep: str) -> set[str]:
    """The source files a code dep stands for: itself, or a package directory's modules (its docstring-only
    ``__init__.py`` aside, see test_package_inits_hold_only_a_docstring)."""
    path = REPO / dep
    if path.is_dir():
        return {f.relative_to(REPO).as_posix() for f in path.rglob("*.py") if f.name != "__init__.py"}
    return {dep}


def canonical_deps(code: set[str]) -> list[str]:
    """``code`` as dvc.yaml lists it: each package directory whose modules all belong to ``code`` as the
    directory, every other file by itself."""
    packages = sorted({(REPO / f).parent.relative_to(REPO).as_posix() for f in code} - {"src/aigid"})
    whole = [p for p in packages if modules_of(p) <= code]
    covered = set().union(*(modules_of(p) for p in whole))
    return sorted(whole + [f for f in code if f not in covered and not f.endswith("/__init__.py")])


def declared_code(stage: str) -> list[str]:
    return sorted(d for d in STAGES[stage].get("deps", []) if d.startswith("src/"))


def test_package_inits_hold_only_a_docstring():
    """Importing a package then runs nothing, so a stage's code is exactly the modules it imports."""
    for init in sorted(SRC.rglob("__init__.py")):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), init


def test_the_command_line_profiles_exactly_the_pipeline_stages():
    assert cli.STAGES == tuple(STAGES)  # the compute profile is set before each of them imports torch


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_the_import_closure_of_the_stage(stage):
    expected, listed = canonical_deps(stage_code(stage)), declared_code(stage)
    assert listed == expected, f"dvc.yaml stage {stage}: code deps should be exactly\n" + "\n".join(
        f"      - {d}" for d in expected
    )
    assert set().union(*map(modules_of, listed)) == stage_code(stage) - {
        f for f in stage_code(stage) if f.endswith("/__init__.py")
    }


# At most this many `src/aigid` lines in all of dvc.yaml: shared code lives in packages a stage imports whole.
MAX_CODE_DEPS = 45


def test_the_code_deps_of_all_stages_total_at_most_the_cap():
    total = sum(len(declared_code(stage)) for stage in STAGES)
    assert total <= MAX_CODE_DEPS, f"dvc.yaml lists {total} code deps (at most {MAX_CODE_DEPS})"


def _imported_modules(tree: ast.AST) -> set[str]:
    """Every module an ``import`` names, and ``package.name`` for each ``from package import name``."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def test_test_helpers_and_benchmarks_use_no_stage_module():
    """A stage module is a stage, not a library: the tests' shared helpers and the benchmarks use the layers
    below it, or run the command (`aigid <stage>`). A stage's own unit tests may import it."""
    files = [REPO / "tests/helpers.py", REPO / "tests/standins.py", *sorted((REPO / "benchmarks").rglob("*.py"))]
    assert len(files) > 3
    uses = {
        f"{file.relative_to(REPO)}: {name}"
        for file in files
        for name in _imported_modules(ast.parse(file.read_text()))
        if name == "aigid.stages" or name.startswith("aigid.stages.")
    }
    assert uses == set()
    assert "aigid.stages.encoders" in _imported_modules(ast.parse("from aigid.stages import encoders"))


def test_a_directory_dep_is_listed_only_where_the_stage_runs_all_of_it():
    """Listing src/aigid/detector for `encoders` (which imports only the runtime) would rerun it for any
    detector edit: the canonical list keeps the single file there, and it fails the check above."""
    encoders = canonical_deps(stage_code("encoders"))
    assert "src/aigid/detector/runtime.py" in encoders and "src/aigid/detector" not in encoders
    assert "src/aigid/detector" in canonical_deps(stage_code("train"))
    too_wide = sorted({*encoders, "src/aigid/detector"} - {"src/aigid/detector/runtime.py"})
    assert set().union(*map(modules_of, too_wide)) != stage_code("encoders")
    missing = [d for d in canonical_deps(stage_code("train")) if d != "src/aigid/detector"]
    assert missing != canonical_deps(stage_code("train"))


# The packages from the bottom up (aigid/__init__.py): each imports only from itself and the ranks below it.
LAYERS = {
    "core": 0,
    "detector": 1,
    "sources": 1,
    "tracking": 1,
    "training": 2,
    "serving": 3,
    "stages": 4,
    "tools": 4,
    "cli": 5,
}


def test_imports_point_down_the_layers():
    """Stages and tools on top, serving and training below them, the detector and core at the bottom: no import
    points back up (a detector module importing a stage's, say), and no package is left out of the list."""
    upward = []
    for file in sorted((SRC / "aigid").rglob("*.py")):
        name = file.relative_to(SRC).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        own = name.split(".")[1] if "." in name else None
        if own is None:
            continue
        assert own in LAYERS, f"{file}: package {own} has no place in LAYERS"
        for target in _imports(name, ast.parse(file.read_text())):
            other = target.split(".")[1]
            if other != own and LAYERS[other] >= LAYERS[own]:
                upward.append(f"{name} imports {target}")
    assert upward == []


def test_the_closure_follows_imports_inside_functions_and_relative_imports():
    assert "src/aigid/sources/demo.py" in stage_code("prepare")  # imported inside prepare()
    assert "src/aigid/serving/registry.py" in stage_code("evaluate")
    for stage in ("prepare", "encoders", "features", "train", "pseudolabel", "retrain"):
        assert "src/aigid/tools/detect.py" not in stage_code(stage)
    train = stage_code("train")
    assert {"src/aigid/detector/model.py", "src/aigid/core/data.py"} <= train
    assert not train & {
        "src/aigid/serving/registry.py",
        "src/aigid/stages/evaluate.py",
        "src/aigid/sources/readers.py",
        "src/aigid/sources/demo.py",
        "src/aigid/stages/prepare.py",
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
    # The values that name entries of lookup tables, which the stages check where they use them.
    from aigid.core.errors import choice
    from aigid.detector.model import FUSIONS
    from aigid.sources.readers import LAYOUTS
    from aigid.stages.evaluate import perturbations

    choice(FUSIONS, params.model.fusion, "model.fusion")
    choice(dict.fromkeys(("auto", "hub", *LAYOUTS)), params.prepare.layout, "prepare.layout")
    assert perturbations(params.evaluate)
    assert _keys(yaml.safe_load((REPO / config).read_text())) == _keys(
        yaml.safe_load((REPO / "params.yaml").read_text())
    )


def test_every_install_line_takes_torch_and_torchvision_at_the_lock_pins():
    """torch and torchvision are installed first, by hand, before the lock (an unpinned torch pulls the newest
    CUDA build): the README's two commands and .ci/run must install the versions requirements.lock pins, and
    the lock must pin both. The GitHub workflow installs nothing itself: it runs .ci/run, so the two cannot
    drift."""
    import re

    pins = dict(
        line.split("==")
        for line in (REPO / "requirements.lock").read_text().split()
        if line.split("==")[0] in ("torch", "torchvision")
    )
    assert set(pins) == {"torch", "torchvision"}
    expected = f"pip install torch=={pins['torch']} torchvision=={pins['torchvision']}"
    places = {"README.md": 2, ".ci/run": 1, ".github/workflows/ci.yml": 0}  # the workflow runs .ci/run
    for name, count in places.items():
        text = (REPO / name).read_text()
        lines = [m.group(0) for m in re.finditer(r"pip install (-q )?torch\S*( torchvision\S*)?", text)]
        assert len(lines) == count, f"{name}: {lines}"
        assert all(line.replace("-q ", "") == expected for line in lines), f"{name}: {lines}, expected {expected}"


def test_the_github_workflow_runs_the_ci_script():
    steps = yaml.safe_load((REPO / ".github/workflows/ci.yml").read_text())["jobs"]["test-and-repro"]["steps"]
    runs = [s["run"] for s in steps if "run" in s]
    assert any(r.strip() == "bash .ci/run" for r in runs)
    assert not any(word in r for r in runs for word in ("pytest", "dvc repro", "pip install", "ruff"))


def test_no_function_is_longer_than_60_lines():
    """A function reads in one screen: past 60 lines (its signature and docstring included) it is split."""
    long = []
    for file in sorted((SRC / "aigid").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{file.relative_to(SRC)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert long == []
