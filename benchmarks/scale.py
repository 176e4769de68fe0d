"""The pipeline at scale: every stage on a demo dataset of N images, its wall time and peak memory.

    python benchmarks/scale.py --rows 10000
    python benchmarks/scale.py --rows 100000 --dir /tmp/aigid-scale-100k --keep

In a scratch directory (a temporary one unless ``--dir``), with params.yaml's values except those below, it runs
the real commands one after the other, each as its own process (wall time; max RSS from the kernel's rusage, as
``/usr/bin/time -f %M`` gives it; and, sampled every 50 ms, the peaks of its anonymous memory and of the pages of
memory-mapped files such as the Arrow tables, which max RSS counts too):
`aigid prepare` (the embedded demo generator, ``--rows / 6`` captions: 20% train, 5% validation, 5% test, 70%
unlabeled, so that the pseudo-labelling pool is the large split), `aigid encoders`, `aigid features` in
frozen-encoder mode for both fusions (``model.fusion: concat`` and ``cross_attention``, the second into
``data/features_xattn``), one epoch of `aigid train`, `aigid pseudolabel` over the pool, one epoch of
`aigid retrain`, `aigid export`, `aigid evaluate` (robustness grid shrunk to JPEG quality 75 and blur 1: see
``GRID``) and `aigid detect` on a folder of the pool's images written as files, scored by the exported
(portable) model. Every stage runs under the params' ``compute`` profile, as ``aigid <stage>`` applies it.

Not part of the test suite or CI: it takes minutes at 10,000 images and far longer at 100,000.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARES = {"train": 0.20, "validation": 0.05, "test": 0.05, "unlabeled": 0.70}
GRID = {"jpeg": [75], "blur": [1]}  # evaluate.robustness for the run (params.yaml's grid has 7 points)
STAGES = ("prepare", "encoders", "features", "features_xattn", "train", "pseudolabel", "retrain", "export")
STAGES += ("evaluate", "detect")


def captions(rows: int) -> dict[str, int]:
    total = max(len(SHARES), round(rows / 6))
    out = {name: max(1, int(total * share)) for name, share in SHARES.items()}
    out["unlabeled"] += total - sum(out.values())
    return out


def write_params(work: Path, rows: int) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["demo"]["captions"] = captions(rows)
    params["train"].update(freeze_encoders=True, epochs=1)
    params["evaluate"]["robustness"] = GRID
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    params["model"]["fusion"] = "cross_attention"
    (work / "params_xattn.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def command(stage: str) -> list[str]:
    if stage == "features_xattn":
        return ["aigid", "features", "--params", "params_xattn.yaml", "--out", "data/features_xattn"]
    if stage == "detect":
        return ["aigid", "detect", "images", "--model", "models/portable", "--out", "scores.csv", "--quiet"]
    return ["aigid", stage]


def write_images(work: Path) -> int:
    """The pool's images as files (the folder `aigid detect` scores), named by row, in their own format."""
    from aigid.core.data import file_format, open_dataset

    folder = work / "images"
    folder.mkdir(exist_ok=True)
    pool = open_dataset(work / "data" / "prepared")["unlabeled"]
    for start in range(0, len(pool), 1024):
        for i, image in enumerate(pool[start : start + 1024]["Image"]):
            kind = file_format(image["bytes"]).lower().replace("jpeg", "jpg")
            (folder / f"{start + i:07d}.{kind}").write_bytes(image["bytes"])
    return len(pool)


def _rss(pid: int) -> tuple[int, int]:
    """The process's resident memory now, in KiB: anonymous (what it allocated) and file-backed (the pages of the
    files it has memory-mapped, such as Arrow tables, which the kernel can drop and read again)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return 0, 0
    return tuple(int(fields.get(k, "0 kB").split()[0]) for k in ("RssAnon", "RssFile"))


def run_stage(work: Path, stage: str, log) -> dict:
    """Run one stage as a process: its wall time, its peak resident memory (max RSS, as /usr/bin/time's %M), and
    the peaks of its anonymous and file-backed parts, sampled every 50 ms."""
    started = time.perf_counter()
    proc = subprocess.Popen(command(stage), cwd=work, stdout=log, stderr=subprocess.STDOUT)
    anon = mapped = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now_anon, now_mapped = _rss(proc.pid)
        anon, mapped = max(anon, now_anon), max(mapped, now_mapped)
        time.sleep(0.05)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{stage} failed ({proc.returncode}); see {log.name}")
    return {
        "stage": stage,
        "wall_s": round(wall, 1),
        "peak_mb": round(usage.ru_maxrss / 1024),
        "anon_mb": round(anon / 1024),
        "mapped_mb": round(mapped / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, required=True, help="images to generate (6 per caption)")
    parser.add_argument("--dir", type=Path, help="scratch directory (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep --dir's contents")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="aigid-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "data" / "raw").mkdir(parents=True, exist_ok=True)
    write_params(work, args.rows)
    env_root = os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    print(f"# {args.rows} images in {work}; captions {captions(args.rows)}; MLflow {env_root}", file=sys.stderr)
    results = []
    try:
        with (work / "stages.log").open("a") as log:
            for stage in args.stages.split(","):
                if stage == "detect" and not (work / "images").is_dir():
                    write_images(work)
                results.append({"rows": args.rows, **run_stage(work, stage, log)})
                r = results[-1]
                print(
                    f"{stage:15s} {r['wall_s']:8.1f} s {r['peak_mb']:6d} MB max RSS "
                    f"({r['anon_mb']} anonymous, {r['mapped_mb']} mapped files)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        if not (args.dir and args.keep):
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
