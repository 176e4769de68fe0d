"""The real pipeline, end to end: `dvc repro` in a temporary copy of the repository on a tiny configuration."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from aigid.core.data import open_dataset
from helpers import STAGES, _env, _run, sh

pytestmark = pytest.mark.slow


def _stdout(cmd, cwd: Path) -> str:
    return _run(cmd, cwd).stdout


def versions(root: Path | None = None, name: str = "aigid-detector") -> list:
    """The registered versions of ``name`` in the store of ``root`` (default: the store MLflow points at)."""
    if root is not None:
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return sorted(mlflow.MlflowClient().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def runs(root: Path):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["aigid"], output_format="list")


def test_repro_writes_models_metrics_and_plots(project):
    for path in (
        "models/base/model.safetensors",
        "models/retrained/model.safetensors",
        "data/prepared/dataset_dict.json",
        "data/pseudolabel/dataset_dict.json",
        "metrics/plots/confusion_b_retrained.json",
        "metrics/train_history.json",
    ):
        assert (project / path).exists(), path
    evaluation = json.loads((project / "reports/evaluate.json").read_text())
    for model in ("base", "retrained"):
        for task in ("task_a", "task_b"):
            assert {"f1_weighted", "balanced_accuracy", "f1_macro", "accuracy"} <= set(evaluation[model][task])
        assert set(evaluation[model]["per_class"]) == {"real", "sd21", "sdxl", "sd3", "dalle3", "midjourney6"}
    assert evaluation["contaminated"] is False
    pseudo = json.loads((project / "reports/pseudolabel.json").read_text())
    assert pseudo["kept"] == pseudo["train_rows"] + pseudo["validation_rows"]
    prepared = json.loads((project / "reports/prepare.json").read_text())
    assert prepared["shared_captions_train_validation"] == 0 and len(prepared["fingerprint"]) == 64
    assert set(prepared["formats"]["test"]) == set(prepared["splits"]["test"]["per_class"])
    exported = json.loads((project / "reports/export.json").read_text())  # models/portable, checked
    assert exported["rows"] > 2 and exported["graph_max_logit_difference"] < 1e-3
    assert exported["max_prob_ai_difference"] < 0.02 and exported["label_agreement"] >= 0.99


def test_metrics_files_hold_the_headline_numbers_of_the_reports(project):
    report = json.loads((project / "reports/evaluate.json").read_text())
    headline = json.loads((project / "metrics/evaluate.json").read_text())
    for model in ("base", "retrained"):
        assert headline[model]["task_a"]["f1_weighted"] == report[model]["task_a"]["f1_weighted"]
        assert headline[model]["operating_point"]["test_tpr"] == report[model]["operating_point"]["test_tpr"]
    pseudo = json.loads((project / "reports/pseudolabel.json").read_text())
    from aigid.stages.pseudolabel import HEADLINE

    assert json.loads((project / "metrics/pseudolabel.json").read_text()) == {k: pseudo[k] for k in HEADLINE}
    assert {"kept", "precision_a", "estimated_precision_a", "estimated_kept"} <= set(HEADLINE)
    assert pseudo["precision_a"] == pseudo["correct_a"] / pseudo["kept"]
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=project))
    keys = [k for files in shown.values() for m in files["data"].values() for k in _leaves(m["data"])]
    assert 10 <= len(keys) <= 45, keys  # with retrained_vs_base and the pseudo-label estimate, 41 on the demo


def _leaves(d: dict, prefix: str = "") -> list[str]:
    return [
        k for key, v in d.items() for k in (_leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])
    ]


def test_evaluate_reports_curves_operating_point_captions_robustness_and_the_unseen_generator(project):
    evaluation = json.loads((project / "reports/evaluate.json").read_text())
    conditions = {"clean", "jpeg_95", "jpeg_75", "jpeg_50", "blur_1", "blur_2", "resize_50", "resize_150"}
    for model in ("base", "retrained"):
        result = evaluation[model]
        assert 0.0 <= result["roc_auc"] <= 1.0 and 0.0 <= result["average_precision"] <= 1.0
        op = result["operating_point"]
        assert op["target_fpr"] == 0.05 and op["validation_fpr"] <= 0.05 and 0.0 <= op["test_tpr"] <= 1.0
        assert set(result["captions"]) == {"with", "without"}
        assert result["captions"]["with"]["task_a_f1_weighted"] == result["task_a"]["f1_weighted"]
        assert set(result["robustness"]) == conditions
        assert set(result["robustness"]["jpeg_50"]["per_class"]) == set(result["per_class"])
        assert result["unseen_generator"] == {
            "name": "sd3",
            "n": result["per_class"]["sd3"]["n"],
            "detection_rate": result["per_class"]["sd3"]["task_a_recall"],
        }
        roc = json.loads((project / f"metrics/plots/roc_{model}.json").read_text())
        assert roc[0] == {"fpr": 0.0, "tpr": 0.0} and roc[-1] == {"fpr": 1.0, "tpr": 1.0}
        assert (project / f"metrics/plots/pr_{model}.json").is_file()
        rows = json.loads((project / f"metrics/plots/robustness_{model}.json").read_text())
        assert {r["condition"] for r in rows} == conditions
        reliability = json.loads((project / f"metrics/plots/reliability_{model}.json").read_text())
        assert sum(r["count"] for r in reliability) == evaluation["test_rows"]
        _check_calibration_and_verdict(project, model, result)
        control = result["format_control"]
        assert control["jpeg_quality"] == 90 and set(control["per_class"]) == set(result["per_class"])
        assert (
            sum(c["n"] for f in control["by_original_format"].values() for c in f.values()) == evaluation["test_rows"]
        )
    assert json.loads((project / "models/retrained/config.json").read_text())["holdout"] == "sd3"
    html = sh("dvc", "plots", "show", "--json", cwd=project)
    assert "Robustness, detection rate per class (retrained)" in html and "Task A ROC on the test split" in html
    assert "Task A reliability of P(AI)" in html


def _check_calibration_and_verdict(project: Path, model: str, result: dict) -> None:
    """The model's rule (its scoring.json, fitted by train/retrain on validation) is what evaluate measures: its
    thresholds meet their targets on validation, the band between them is the unsure verdict."""
    rule = json.loads((project / f"models/{model}/scoring.json").read_text())
    assert rule["trained_on"]["source"] == "demo" and rule["trained_on"]["synthetic"] is True
    cal, verdict, op = result["calibration"], result["verdict"], result["operating_point"]
    assert cal["temperature"] == rule["calibration"]["temperature"] != 1.0
    assert {"ece", "ece_uncalibrated"} <= set(cal)
    assert verdict["threshold"] == op["threshold"] == rule["verdict"]["threshold"]
    assert verdict["lower"] == rule["verdict"]["lower"] <= verdict["threshold"]
    assert verdict["validation_fpr_verdict"] <= verdict["target_fpr"] == 0.05
    assert verdict["validation_fnr_verdict"] <= verdict["target_fnr"] == 0.05
    assert verdict["validation_coverage"] == rule["verdict"]["validation_coverage"]
    raw = json.loads((project / f"metrics/plots/reliability_uncalibrated_{model}.json").read_text())
    assert sum(r["count"] for r in raw) == sum(r["n"] for r in result["per_class"].values())


def test_retrained_model_is_registered_loadable_by_name_and_used_by_detect(project, tmp_path):
    import base64

    import pandas as pd

    runs(project)  # points MLflow at the project's store
    assert any((project / "mlartifacts").rglob("model.safetensors"))  # not in a working-directory ./mlruns
    (version,) = versions()
    assert mlflow.MlflowClient().get_model_version_by_alias("aigid-detector", "candidate").version == version.version
    assert len(version.tags["model_hash"]) == 64 and version.tags["git_commit"] != ""
    card = (project / "reports/model_card.md").read_text()  # the model card, as the version's description too
    assert card.startswith("---\n") and "model-index:" in card and "## Calibration and verdict" in card
    assert "synthetic demo data" in card and version.description == card
    model = mlflow.pyfunc.load_model("models:/aigid-detector@candidate")
    image = next((project / "mlartifacts").rglob("input_example.json"))  # the logged example: a test image
    example = json.loads(image.read_text())
    frame = pd.DataFrame(example["data"], columns=example["columns"])
    out = model.predict(frame)
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    threshold = evaluation["retrained"]["operating_point"]["threshold"]
    assert list(out.columns[:6]) == ["error", "verdict", "prob_ai", "label", "generator", "threshold"]
    assert out["error"][0] == "" and out["threshold"][0] == threshold
    png = tmp_path / "x.png"
    png.write_bytes(base64.b64decode(frame["image"][0]))
    sh(
        "aigid",
        "detect",
        str(png),
        "--model",
        "models:/aigid-detector@candidate",
        "--format",
        "json",
        "--caption",
        frame["caption"][0],
        "--threshold-from",
        "metrics/evaluate.json",
        "-q",
        "--out",
        str(tmp_path / "rows.json"),
        cwd=project,
    )
    row = json.loads((tmp_path / "rows.json").read_text())[0]
    assert abs(row["prob_ai"] - out["prob_ai"][0]) < 1e-6 and row["threshold"] == threshold


def _lock_md5(root: Path, path: str) -> str:
    """DVC's hash of ``path`` as dvc.lock records it (an output of some stage)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return next(o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", []) if o["path"] == path)


def _inputs(run) -> dict[str, tuple[str, str]]:
    """A run's logged datasets: name -> (context, digest)."""
    return {
        d.dataset.name: (next(t.value for t in d.tags if t.key == "mlflow.data.context"), d.dataset.digest)
        for d in run.inputs.dataset_inputs
    }


def test_mlflow_one_parent_run_per_execution_with_stage_runs_datasets_and_dvc_keys(project):
    all_runs = runs(project)
    (parent,) = [r for r in all_runs if r.data.tags.get("aigid.role") == "pipeline"]
    commit = sh("git", "rev-parse", "--short=7", "HEAD", cwd=project).strip()
    assert parent.info.run_name == f"repro-{commit}-{parent.data.tags['pipeline_id'][:8]}"  # one name per execution
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert sorted(by_stage) == ["evaluate", "pseudolabel", "retrain", "train"] and len(children) == 4
    assert {r.data.tags["pipeline_id"] for r in children} == {parent.data.tags["pipeline_id"]}
    experiment = mlflow.get_experiment_by_name("aigid")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view

    # Params under their params.yaml keys, plus a few Trainer settings; not the Trainer's whole argument list.
    train = by_stage["train"]
    assert train.data.params["train.epochs"] == "2" and train.data.params["trainer.optim"].startswith("adamw")
    assert len(train.data.params) < 60 and not any(k.startswith("params.") for k in train.data.params)
    assert by_stage["pseudolabel"].data.params["threshold"] == "0.2" == parent.data.params["threshold"]
    # Metrics under the DVC keys, the per-epoch curves beside them.
    for stage, file in (
        ("train", "train"),
        ("retrain", "retrain"),
        ("pseudolabel", "pseudolabel"),
        ("evaluate", "evaluate"),
    ):
        dvc_metrics = json.loads((project / f"metrics/{file}.json").read_text())
        logged = {k: v for k, v in by_stage[stage].data.metrics.items() if not k.startswith("history/")}
        expected = {k: float(v) for k, v in _flat(dvc_metrics).items() if v is not None}
        assert logged == pytest.approx(expected), stage
    assert (
        parent.data.metrics["retrained.task_a.f1_weighted"]
        == by_stage["evaluate"].data.metrics["retrained.task_a.f1_weighted"]
    )
    for stage in ("train", "retrain"):
        for name in ("history/f1_weighted_a", "history/f1_weighted_b"):
            steps = [m.step for m in mlflow.MlflowClient().get_metric_history(by_stage[stage].info.run_id, name)]
            assert steps == [1, 2], (stage, name)  # one point per epoch
    # Dataset lineage: the splits each stage read, with DVC's hash of the directory as digest.
    prepared, pseudo = _lock_md5(project, "data/prepared"), _lock_md5(project, "data/pseudolabel")
    assert _inputs(train) == {
        "data/prepared:train": ("training", prepared),
        "data/prepared:validation": ("validation", prepared),
    }
    assert _inputs(by_stage["retrain"])["data/pseudolabel:train"] == ("training", pseudo)
    assert _inputs(by_stage["pseudolabel"]) == {  # the pool, and the validation rows the estimate is made on
        "data/prepared:unlabeled": ("pool", prepared),
        "data/prepared:validation": ("validation", prepared),
    }
    assert _inputs(by_stage["evaluate"])["data/prepared:test"] == ("test", prepared)
    assert all(r.data.tags["git_commit"] != "unknown" for r in children)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_second_repro_does_nothing(project):
    out = sh("dvc", "repro", cwd=project)
    assert "Running stage" not in out
    assert "up to date" in out


def test_threshold_experiment_reruns_only_downstream_stages(project):
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "pipeline outputs", cwd=project)
    before = json.loads((project / "reports/pseudolabel.json").read_text())
    out = sh("dvc", "exp", "run", "-S", "threshold=0.4", cwd=project)
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == {"pseudolabel", "retrain", "evaluate", "export"}, out
    after = json.loads((project / "reports/pseudolabel.json").read_text())
    assert after["threshold"] == 0.4 and after["kept"] < before["kept"]
    tagged = [r for r in runs(project) if r.data.tags.get("dvc_exp_name") and "stage" in r.data.tags]
    assert {r.data.tags["stage"] for r in tagged} == {"pseudolabel", "retrain", "evaluate"}
    first, second = versions(project)  # another model: a new version, and it is the candidate
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias("aigid-detector", "candidate").version == second.version
    assert second.tags["dvc_exp_name"] and first.tags["model_hash"] != second.tags["model_hash"]
    # The experiment is a parent run of its own, named after it (and the execution), holding the three stages it ran.
    parents = {
        r.info.run_name.removesuffix(f"-{r.data.tags['pipeline_id'][:8]}"): r
        for r in runs(project)
        if r.data.tags.get("aigid.role") == "pipeline"
    }
    exp_name = second.tags["dvc_exp_name"]
    assert len(parents) == 2 and exp_name in parents
    nested = [r for r in runs(project) if r.data.tags.get("mlflow.parentRunId") == parents[exp_name].info.run_id]
    assert sorted(r.data.tags["stage"] for r in nested) == ["evaluate", "pseudolabel", "retrain"]
    # Promotion: @champion moves to the experiment's model only if it scores higher on the same test data.
    metric = "retrained.task_a.balanced_accuracy"
    score = {v.version: client.get_run(v.run_id).data.metrics[metric] for v in (first, second)}
    client.set_registered_model_alias("aigid-detector", "champion", first.version)
    out = sh("aigid", "promote", cwd=project)
    champion = client.get_model_version_by_alias("aigid-detector", "champion").version
    assert champion == (second.version if score[second.version] > score[first.version] else first.version), out


def test_pseudo_labelling_the_test_split_flags_evaluate_as_contaminated(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pseudolabel"]["pool"] = "test"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sh(
        "aigid",
        "evaluate",
        "--params",
        str(tmp_path / "params.yaml"),
        "--metrics",
        str(tmp_path / "e.json"),
        "--report",
        str(tmp_path / "r.json"),
        "--plots",
        str(tmp_path / "plots"),
        "--card",
        str(tmp_path / "card.md"),
        cwd=project,
    )
    assert json.loads((tmp_path / "e.json").read_text())["contaminated"] is True


def test_forced_rerun_gives_identical_metrics_files(project):
    files = lambda: [*(project / "metrics").rglob("*.json"), *(project / "reports").rglob("*")]  # noqa: E731
    parents = lambda: {r.info.run_id for r in runs(project) if r.data.tags.get("aigid.role") == "pipeline"}  # noqa: E731
    before, registered, earlier = {p: p.read_bytes() for p in files()}, len(versions(project)), parents()
    sh("dvc", "repro", "--force", cwd=project)
    after = {p: p.read_bytes() for p in files()}
    assert before.keys() == after.keys()
    assert [p.name for p in before if before[p] != after[p]] == []
    assert len(versions(project)) == registered  # the same model is not registered twice
    # Another execution of the same commit in the same workspace: a parent run of its own, holding its stages.
    (new,) = parents() - earlier
    nested = [r for r in runs(project) if r.data.tags.get("mlflow.parentRunId") == new]
    assert sorted(r.data.tags["stage"] for r in nested) == ["evaluate", "pseudolabel", "retrain", "train"]


def test_push_then_pull_into_a_fresh_clone_reruns_nothing(project, tmp_path):
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "storage", str(remote), cwd=project)
    sh("dvc", "push", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "outputs pushed to the remote", cwd=project)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    sh("dvc", "pull", cwd=clone)
    assert (clone / "models/retrained/model.safetensors").is_file()
    status = sh("dvc", "status", cwd=clone)
    assert "up to date" in status, status
    out = sh("dvc", "repro", cwd=clone)
    assert "Running stage" not in out

    # evaluate did not run here, so the clone's own MLflow store has no registered model: one command fixes it.
    png = clone / "x.png"
    png.write_bytes(open_dataset(clone / "data/prepared")["test"][0]["Image"]["bytes"])
    detect = ["aigid", "detect", str(png), "--model", "models:/aigid-detector@candidate", "-q", "--format", "json"]
    failed = subprocess.run(detect, cwd=clone, env=_env(), capture_output=True, text=True)
    assert failed.returncode != 0 and "`aigid register`" in failed.stderr and "Traceback" not in failed.stderr
    assert "registered" in sh("aigid", "register", cwd=clone)
    sh("aigid", "register", cwd=clone)  # a second time: nothing new
    (version,) = versions(clone)
    assert mlflow.MlflowClient().get_model_version_by_alias("aigid-detector", "candidate").version == version.version
    rows = json.loads(_stdout(detect, clone))
    assert len(rows) == 1 and rows[0]["error"] == "" and 0.0 <= rows[0]["prob_ai"] <= 1.0


def _changed(root: Path) -> set[str]:
    """The stages `dvc status` reports as changed."""
    status = json.loads(sh("dvc", "status", "--json", cwd=root))
    return {name.split(":")[-1] for name in status}


def test_a_code_edit_reruns_exactly_the_stages_that_import_it(project):
    """Also through a directory dependency (dvc.yaml lists src/aigid/detector as a whole for most stages), and
    Python's byte-code caches inside those directories are no dependency (.dvcignore)."""
    assert _changed(project) == set()
    code = project / "src/aigid"
    edited = ["tools/detect.py", "serving/registry.py", "detector/model.py", "detector/cache.py"]
    originals = {name: (code / name).read_text() for name in edited}

    def edit(name):
        (code / name).write_text(originals[name] + "# a comment\n")

    try:
        edit("tools/detect.py")
        assert _changed(project) == set()  # detect is no stage's dependency
        (code / "detector/__pycache__").mkdir(exist_ok=True)
        (code / "detector/__pycache__/extra.cpython-311.pyc").write_bytes(b"not a dependency")
        assert _changed(project) == set()
        edit("serving/registry.py")
        assert _changed(project) == {"evaluate"}  # only evaluate registers models
        edit("detector/cache.py")  # through the package directory: train's dependency; not export's
        assert _changed(project) == {"features", "train", "pseudolabel", "retrain", "evaluate"}  # + registry
        edit("detector/model.py")
        assert _changed(project) == {"features", "train", "pseudolabel", "retrain", "evaluate", "export"}
    finally:
        for name, text in originals.items():
            (code / name).write_text(text)
        (code / "detector/__pycache__/extra.cpython-311.pyc").unlink(missing_ok=True)
    assert _changed(project) == set()


def test_a_prepare_edit_that_leaves_the_data_alone_stops_at_prepare(project):
    """The prepared dataset's fingerprint comes from its rows, not from the code that wrote them."""
    original = (project / "src/aigid/stages/prepare.py").read_text()
    (project / "src/aigid/stages/prepare.py").write_text(original + "# a comment\n")
    try:
        assert _changed(project) == {"prepare"}
        out = sh("dvc", "repro", cwd=project)
        assert [s for s in STAGES if f"Running stage '{s}'" in out] == ["prepare"], out
    finally:
        (project / "src/aigid/stages/prepare.py").write_text(original)
        sh("dvc", "commit", "-f", "prepare", cwd=project)
    assert _changed(project) == set()


def test_a_local_dataset_under_dvc_reruns_prepare_when_a_file_changes(project):
    """The README's workflow: copy a dataset under data/raw, `dvc add` it, point prepare.source at it."""
    from PIL import Image

    mini = project / "data/raw/mini"
    for k, name in enumerate(("real", "sd21", "sdxl", "sd3", "dalle3", "midjourney6")):
        for i in range(8):
            rgb = np.random.default_rng(10 * k + i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            (mini / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(mini / name / f"{i}.png")
    sh("dvc", "add", "data/raw/mini", cwd=project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["source"] = "data/raw/mini"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("dvc", "repro", "prepare", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "local dataset", cwd=project)
    assert "prepare" not in _changed(project)
    fingerprint = json.loads((project / "reports/prepare.json").read_text())["fingerprint"]

    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(mini / "sd3" / "0.png")  # one image fixed
    assert "prepare" in _changed(project)
    out = sh("dvc", "repro", "prepare", cwd=project)
    assert "Running stage 'prepare'" in out
    assert json.loads((project / "reports/prepare.json").read_text())["fingerprint"] != fingerprint
    assert {"encoders", "features", "train"} <= _changed(project)  # what reads data/prepared follows
