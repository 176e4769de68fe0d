"""The pipeline at scale: every stage on a dataset of N images in the Hub's layout, its wall time and peak memory.

    python benchmarks/scale.py --rows 10000 --cold --json scale-10k.json
    python benchmarks/scale.py --rows 100000 --cap-from scale-10k.json --json scale-100k.json

In a scratch directory (a temporary one unless ``--dir``), it first writes the dataset as a Hugging Face Hub
dataset repository is downloaded (``hf download --repo-type dataset``): ``data/raw/defactify/`` with README.md
(its ``configs:`` header), .gitattributes and ``data/<split>-NNNNN-of-NNNNN.parquet`` shards of at most
``SHARD_ROWS`` rows with the columns Image, Caption, Label_A, Label_B, as Defactify has them. The rows are the
embedded demo generator's (``--rows / 6`` captions, 6 images each: 20% train, 5% validation, 5% test, 70%
unlabeled, so that the pseudo-labelling pool is the large split); `aigid prepare` reads them through the parquet
reader (``prepare.source: data/raw/defactify``).

Then, with params.yaml's values except those below, it runs the real commands one after the other, each as its
own process (wall time; max RSS from the kernel's rusage, as ``/usr/bin/time -f %M`` gives it; and, sampled every
50 ms over the process and those it starts, the peaks of their anonymous memory, of their pages of memory-mapped
files such as the Arrow tables, which max RSS counts too, and of the two summed, ``processes_mb``): `aigid prepare`,
`aigid encoders`, `aigid features` in
frozen-encoder mode for both fusions (``model.fusion: concat`` and ``cross_attention``, the second into
``data/features_xattn``), one epoch of `aigid train`, `aigid pseudolabel` over the pool (and, last, once more
with ``threshold: 0.01``, which keeps and writes every pool row: ``pseudolabel_all``), one epoch of
`aigid retrain`, `aigid export`, `aigid evaluate` (robustness grid shrunk to JPEG quality 75 and blur 1: see
``GRID``), `aigid detect` on a folder of the pool's images written as files, scored by the exported
(portable) model, and `aigid score-table` on the same folder on Spark, ``local[1]`` and ``local[2]``
(``spark_local1``, ``spark_local2``), with the version evaluate registered (its exported form, as detect's). For
Spark, max RSS is its largest process's; ``processes_mb`` sums the driver, the JVM and the Python workers.
Every stage runs under the params' ``compute`` profile, as ``aigid <stage>`` applies it.

With ``--cold`` (root, Linux), the page cache is written back and dropped (``/proc/sys/vm/drop_caches``) before
every stage, which then runs in a memory cgroup of its own: max RSS no longer depends on which files an earlier
stage left cached (the kernel maps cached pages around each one a process touches), the files the stage reads are
charged to it rather than to the stage that wrote them, and ``group_peak_mb`` is the most the group was charged,
page cache included. With ``--cap-from`` (implies ``--cold``), that cgroup is limited to ``--cap-ratio`` (1.2)
times the memory the same stage had in an earlier run's ``--json`` (the 10,000-image run; max RSS, or
``processes_mb`` where larger): the kernel, not a
measurement, then holds the stage to the target. Page cache is reclaimed at the limit (``limit_hits`` counts how
often); a stage whose anonymous memory outgrew it would be killed, and the run stops there.

Not part of the test suite or CI: on 2 cores it takes about 5 minutes at 10,000 images and 15 at 100,000.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARD_ROWS = 10_000  # rows per parquet shard (the Hub cuts at 500 MB; these images are small)
HUB_DIR = "data/raw/defactify"
SPARK_CONF = ("--conf", "spark.ui.enabled=false")
SHARES = {"train": 0.20, "validation": 0.05, "test": 0.05, "unlabeled": 0.70}
GRID = {"jpeg": [75], "blur": [1]}  # evaluate.robustness for the run (params.yaml's grid has 7 points)
STAGES = ("prepare", "encoders", "features", "features_xattn", "train", "pseudolabel", "retrain", "export")
STAGES += ("evaluate", "detect", "spark_local1", "spark_local2", "pseudolabel_all")
IMAGES = ("detect", "spark_local1", "spark_local2")  # the stages that score the pool's images as files


def captions(rows: int) -> dict[str, int]:
    total = max(len(SHARES), round(rows / 6))
    out = {name: max(1, int(total * share)) for name, share in SHARES.items()}
    out["unlabeled"] += total - sum(out.values())
    return out


def write_params(work: Path, rows: int) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["source"] = HUB_DIR
    params["train"].update(freeze_encoders=True, epochs=1)
    params["evaluate"]["robustness"] = GRID
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # pseudolabel_all: every pool row passes the threshold, and is written with its pseudo-labels
    (work / "params_all.yaml").write_text(yaml.safe_dump({**params, "threshold": 0.01}, sort_keys=False))
    params["model"]["fusion"] = "cross_attention"
    (work / "params_xattn.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def command(stage: str) -> list[str]:
    if stage == "features_xattn":
        return ["aigid", "features", "--params", "params_xattn.yaml", "--out", "data/features_xattn"]
    if stage == "pseudolabel_all":
        out = ["--out", "data/pseudolabel_all", "--metrics", "pseudolabel_all.json", "--report", "reports/all.json"]
        return ["aigid", "pseudolabel", "--params", "params_all.yaml", *out]
    if stage.startswith("spark_local"):  # the same files on Spark, with the model evaluate registered
        master = f"local[{stage[-1]}]"
        return ["aigid", "score-table", "images", "--out", f"{stage}.parquet", "--master", master, *SPARK_CONF]
    if stage == "detect":
        return ["aigid", "detect", "images", "--model", "models/portable", "--out", "scores.csv", "--quiet"]
    return ["aigid", stage]


def write_hub(work: Path, rows: int) -> dict[str, int]:
    """The demo generator's rows as a Hub dataset repository is downloaded (see the module's docstring): rows per
    split. Written shard by shard from memory-mapped Arrow, so that memory stays flat."""
    from aigid.core.data import RAW_COLUMNS
    from aigid.sources.demo import generate_demo

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    root = work / HUB_DIR
    (root / "data").mkdir(parents=True, exist_ok=True)
    splits = {}
    with tempfile.TemporaryDirectory(prefix=".demo-", dir=work) as cache:
        dsd = generate_demo(captions(rows), params["prepare"]["demo"]["image_size"], params["seed"], cache)
        for split, ds in dsd.items():
            ds = ds.select_columns(list(RAW_COLUMNS))  # Defactify's columns: no caption ids
            shards = math.ceil(len(ds) / SHARD_ROWS)
            for i in range(shards):
                name = f"{split}-{i:05d}-of-{shards:05d}.parquet"
                ds.shard(shards, i, contiguous=True).to_parquet(str(root / "data" / name))
            splits[split] = len(ds)
    configs = [{"config_name": "default", "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}]
    card = yaml.safe_dump({"configs": configs}, sort_keys=False)
    (root / "README.md").write_text(f"---\n{card}---\n\n# Demo images in the layout of Defactify (MS COCOAI)\n")
    (root / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return splits


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
    """The resident memory now of the process and every process it started (Spark's JVM and Python workers), in
    KiB, summed: anonymous (what they allocated) and file-backed (the pages of the files they have memory-mapped,
    such as Arrow tables, which the kernel can drop and read again)."""
    import psutil

    try:
        pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return 0, 0
    anon = mapped = 0
    for each in pids:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{each}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        anon += int(fields.get("RssAnon", "0 kB").split()[0])
        mapped += int(fields.get("RssFile", "0 kB").split()[0])
    return anon, mapped


class MemoryGroup:
    """A memory cgroup for one process and its children, removed on close: it measures what they are charged
    (page cache included) and, given ``mb``, holds them to that many megabytes, swap included. cgroup v1's memory
    hierarchy, or v2 where its memory controller is enabled for new groups. Swap is not used at the limit."""

    V1, V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")

    def __init__(self, name: str, mb: int | None = None):
        limit = str(mb * 2**20) if mb else "max"
        if (self.V1 / "memory.limit_in_bytes").is_file():
            self.dir, self.v1 = self.V1 / name, True
            # swappiness 0: reclaim at the limit never swaps this group's memory out (the swap counter, when
            # accounted, would charge the failures elsewhere).
            writes = [("memory.limit_in_bytes", limit), ("memory.swappiness", "0")] if mb else []
        elif "memory" in _read(self.V2 / "cgroup.subtree_control").split():
            self.dir, self.v1 = self.V2 / name, False
            writes = [("memory.max", limit), ("memory.swap.max", "0")]
        else:
            raise SystemExit("--cold needs a memory cgroup it can create (as root: cgroup v1, or v2 with memory)")
        try:
            self.dir.mkdir()
            for file, value in writes:
                if (self.dir / file).exists():
                    (self.dir / file).write_text(value)
        except OSError as err:
            raise SystemExit(f"--cold: cannot set up the memory cgroup {self.dir} ({err})") from None

    def enter(self) -> None:
        """Run in the child before exec: it and everything it starts count against the limit."""
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> dict:
        """The group's peak usage (MB, page cache included), how often it reached its limit and had memory
        reclaimed, and how many of its processes the kernel killed for want of memory."""
        if self.v1:
            oom = dict(line.split() for line in _read(self.dir / "memory.oom_control").splitlines())
            peak, hits = int(_read(self.dir / "memory.max_usage_in_bytes")), int(_read(self.dir / "memory.failcnt"))
            return {"group_peak_mb": round(peak / 2**20), "limit_hits": hits, "oom_kills": int(oom.get("oom_kill", 0))}
        events = dict(line.split() for line in _read(self.dir / "memory.events").splitlines())
        peak = int(_read(self.dir / "memory.peak") or 0)
        hits, kills = int(events["max"]), int(events["oom_kill"])
        return {"group_peak_mb": round(peak / 2**20), "limit_hits": hits, "oom_kills": kills}

    def close(self) -> None:
        """Remove the group once its processes are gone: Spark's JVM and workers outlive the command by a few
        seconds; whatever still runs after 30 s is killed."""
        deadline = time.monotonic() + 30
        while pids := _read(self.dir / "cgroup.procs").split():
            if time.monotonic() > deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)
        self.dir.rmdir()


def _read(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def drop_page_cache() -> None:
    """Write back and drop the page cache, so that the next stage's reads are charged to its own cgroup (a page
    already cached stays charged to whichever group read or wrote it first)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def run_stage(work: Path, stage: str, log, cold: bool = False, cap_mb: int | None = None) -> dict:
    """Run one stage as a process: its wall time, its peak resident memory (max RSS, as /usr/bin/time's %M), and
    the peaks of its anonymous and file-backed parts, sampled every 50 ms. ``cold``: after
    :func:`drop_page_cache`, in a :class:`MemoryGroup` (of ``cap_mb`` megabytes, when given)."""
    cap = None
    if cold:
        drop_page_cache()
        cap = MemoryGroup(f"aigid-scale-{os.getpid()}-{stage}", cap_mb)
    started = time.perf_counter()
    proc = subprocess.Popen(
        command(stage), cwd=work, stdout=log, stderr=subprocess.STDOUT, preexec_fn=cap.enter if cap else None
    )
    anon = mapped = tree = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now_anon, now_mapped = _rss(proc.pid)
        anon, mapped, tree = max(anon, now_anon), max(mapped, now_mapped), max(tree, now_anon + now_mapped)
        time.sleep(0.05)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {
        "stage": stage,
        "wall_s": round(wall, 1),
        "peak_mb": round(usage.ru_maxrss / 1024),
        "anon_mb": round(anon / 1024),
        "mapped_mb": round(mapped / 1024),
        "processes_mb": round(tree / 1024),
    }
    if cap:
        result |= {"cap_mb": cap_mb, **cap.usage()} if cap_mb else cap.usage()
        cap.close()
    if proc.returncode not in (0, 3):
        killed = f", killed at its {cap_mb} MB cap" if cap and result["oom_kills"] else ""
        raise SystemExit(f"{stage} failed ({proc.returncode}{killed}); see {log.name}: {json.dumps(result)}")
    return result


def caps(path: Path | None, ratio: float) -> dict[str, int]:
    """Each stage's memory cap: ``ratio`` times its memory in the results at ``path``: its max RSS, or for a stage
    of several processes (Spark's driver, JVM and workers) the peak of their sum where that is larger."""
    if path is None:
        return {}
    results = json.loads(path.read_text())
    return {r["stage"]: math.ceil(ratio * max(r["peak_mb"], r.get("processes_mb", 0))) for r in results}


def aside(function, *args):
    """``function(*args)`` in a fresh interpreter: the libraries it loads (datasets, pyarrow) stay out of this
    process, whose pages a stage shares without their counting against the stage's cap."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, required=True, help="images to generate (6 per caption)")
    parser.add_argument("--dir", type=Path, help="scratch directory (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep --dir's contents")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each stage (root)")
    parser.add_argument("--cap-from", type=Path, help="an earlier run's --json: cap each stage's memory (--cold)")
    parser.add_argument("--cap-ratio", type=float, default=1.2, help="the cap, times that run's max RSS (1.2)")
    args = parser.parse_args()
    limits = caps(args.cap_from, args.cap_ratio)
    stages = args.stages.split(",")
    if limits and (missing := [s for s in stages if s not in limits]):
        raise SystemExit(f"--cap-from {args.cap_from}: no result for {', '.join(missing)}")
    work = args.dir or Path(tempfile.mkdtemp(prefix="aigid-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    write_params(work, args.rows)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    # `datasets` converts the parquet files into Arrow in its cache: here, not in the user's home.
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-cache")
    print(f"# {args.rows} images in {work}; captions {captions(args.rows)}", file=sys.stderr)
    results = []
    try:
        if "prepare" in stages:
            started = time.perf_counter()
            rows = aside(write_hub, work, args.rows)
            print(f"# {HUB_DIR}: {rows} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        with (work / "stages.log").open("a") as log:
            for stage in stages:
                if stage in IMAGES and not (work / "images").is_dir():
                    aside(write_images, work)
                if stage.startswith("spark_local"):  # score-table does not overwrite a table
                    shutil.rmtree(work / f"{stage}.parquet", ignore_errors=True)
                cold = args.cold or bool(limits)
                results.append({"rows": args.rows, **run_stage(work, stage, log, cold, limits.get(stage))})
                r = results[-1]
                capped = f"; {r['group_peak_mb']} MB charged" if cold else ""
                capped += f" (cap {r['cap_mb']} MB, reached {r['limit_hits']} times)" if "cap_mb" in r else ""
                print(
                    f"{stage:15s} {r['wall_s']:8.1f} s {r['peak_mb']:6d} MB max RSS "
                    f"({r['anon_mb']} anonymous, {r['mapped_mb']} mapped files){capped}",
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
