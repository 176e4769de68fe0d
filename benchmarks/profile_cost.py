"""What the compute profile costs: training and float32 inference speed under params.yaml's `compute` profile
against the machine's own settings (all cores, its widest vector unit, oneDNN), on the demo and paper-size
encoders of benchmark.py (its bench package prepares the data and the encoders).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package beside this script, however it is run
from bench.common import CONFIGS, PARAMS, compute_profile, detector, infer_batch  # noqa: E402
from bench.run import run_child  # noqa: E402

MODES = ("free", "params")


def child(work: Path, config: str, steps: int) -> dict:
    import torch

    from aigid.core.data import Collator, open_dataset
    from aigid.detector.infer import RunOptions, predict_logits
    from aigid.detector.runtime import configure
    from bench.train import repeat_rows, train_rate

    configure(compute_profile())
    cfg = CONFIGS[config]
    splits = open_dataset(work / "prepared")
    train = repeat_rows(splits["train"], cfg["train_batch"] * (steps + 1))
    torch.manual_seed(0)
    loaded = detector(work)
    collator = Collator(loaded.tokenizer, loaded.processor, 64)
    train_samples_s = train_rate(loaded.model, train, collator, cfg["train_batch"], steps, work / "ckpt")
    loaded, pool, batch = detector(work, "fp32"), splits["unlabeled"], infer_batch()
    options = RunOptions(batch_size=batch, num_workers=0)
    predict_logits(loaded, pool.select(range(min(batch, len(pool)))), options)  # warm-up
    started = time.perf_counter()
    predict_logits(loaded, pool, options)
    return {"train_samples_s": train_samples_s, "infer_images_s": len(pool) / (time.perf_counter() - started)}


def measure(config: str, rounds: int, steps: int, root: Path) -> dict:
    work = root / config
    work.mkdir(parents=True)
    common = ["--work", str(work), "--config", config]
    run_child(["source", *common])
    run_child(["prepare", *common, "--crop", str(CONFIGS[config]["image_size"])])
    run_child(["encoders", *common])
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

    return environment(**yaml.safe_load(PARAMS.read_text())["compute"])


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
