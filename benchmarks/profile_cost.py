"""What the compute profile costs: training and float32 inference speed under params.yaml's `compute` profile
against the machine's own settings (all cores, its widest vector unit, oneDNN), on the demo and paper-size
encoders of benchmark.py.

    python benchmarks/profile_cost.py                    # demo and paper, 3 rounds
    python benchmarks/profile_cost.py --configs demo --rounds 5

Each measurement runs in a child process of its own, the profile's and the free one alternating, so that each
pair shares the machine's conditions; the table gives the median rates and the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402  (its children prepare the data and encoders)

MODES = ("free", "params")


def child(work: Path, config: str, steps: int) -> dict:
    import torch
    from datasets import concatenate_datasets

    from aigid.core.data import Collator, open_dataset
    from aigid.detector.infer import RunOptions, predict_logits
    from aigid.detector.runtime import configure

    configure(bench.compute_profile())
    cfg = bench.CONFIGS[config]
    splits = open_dataset(work / "prepared")
    train = splits["train"]
    while len(train) < cfg["train_batch"] * (steps + 1):
        train = concatenate_datasets([train, train])
    torch.manual_seed(0)
    model, tokenizer, processor = bench._detector(work)
    train_rate = bench._train_rate(
        model, train, Collator(tokenizer, processor, 64), cfg["train_batch"], steps, work / "ckpt"
    )
    detector, pool, batch = bench._detector(work), splits["unlabeled"], bench.infer_batch()
    options = RunOptions(batch, 0, "fp32")
    predict_logits(detector, pool.select(range(min(batch, len(pool)))), options)  # warm-up
    started = time.perf_counter()
    predict_logits(detector, pool, options)
    return {"train_samples_s": train_rate, "infer_images_s": len(pool) / (time.perf_counter() - started)}


def measure(config: str, rounds: int, steps: int, root: Path) -> dict:
    work = root / config
    work.mkdir(parents=True)
    common = ["--work", str(work), "--config", config]
    bench.run_child(["source", *common])
    bench.run_child(["prepare", *common, "--crop", str(bench.CONFIGS[config]["image_size"])])
    bench.run_child(["encoders", *common])
    free_env = {k: v for k, v in os.environ.items() if k != "AIGID_BENCHMARK_COMPUTE"}
    params_env = {**free_env, **profile_environment(), "AIGID_BENCHMARK_COMPUTE": "params"}
    rates: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode, env in (("free", free_env), ("params", params_env)):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", *common, "--steps", str(steps)],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise SystemExit(f"{config} {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rates[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {"config": config, "rounds": rounds}
    for key in ("train_samples_s", "infer_images_s"):
        out[key] = {mode: statistics.median(r[key] for r in rates[mode]) for mode in MODES}
        out[key]["ratio"] = statistics.median(p[key] / f[key] for f, p in zip(rates["free"], rates["params"]))
    return out


def profile_environment() -> dict[str, str]:
    import yaml

    from aigid.core.compute import environment

    return environment(**yaml.safe_load((bench.REPO / "params.yaml").read_text())["compute"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="demo,paper")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        a = argparse.ArgumentParser()
        a.add_argument("--work", type=Path)
        a.add_argument("--config")
        a.add_argument("--steps", type=int)
        c = a.parse_args(args.child)
        print(json.dumps(child(c.work, c.config, c.steps)))
        return
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {len(os.sched_getaffinity(0))} CPU threads; "
        f"profile: {profile_environment()}"
    )
    print(
        "| config | train samples/s free | under the profile | ratio | inference fp32 img/s free | "
        "under the profile | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="aigid-profile-") as root:
        for config in args.configs.split(","):
            r = measure(config, args.rounds, args.steps, Path(root))
            t, i = r["train_samples_s"], r["infer_images_s"]
            print(
                f"| {config} | {t['free']:.1f} | {t['params']:.1f} | {t['ratio']:.2f} | {i['free']:.1f} | "
                f"{i['params']:.1f} | {i['ratio']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
