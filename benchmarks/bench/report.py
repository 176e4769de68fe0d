"""The report: one table row per (config, size), then the targets each run is held to, then notes on the
measurements that have no baseline column (memory growth, preprocessing, the portable detector, the epochs)."""

from __future__ import annotations

import math

from bench.common import CONFIGS

HEADER = [
    "| config | images | prepare img/s | bytes/sample (float32 layout) | train samples/s (128-pad baseline, x) "
    "| inference img/s (batch-1 baseline, x) | inference bf16 img/s (x) | peak MB prepare / train / inference |",
    "|---|---|---|---|---|---|---|---|",
]
TARGETS_HEADER = ["", "| target | measured | met |", "|---|---|---|"]
STAGES = ("prepare", "train", "infer")  # the processes whose peak memory is read


def table(results: list[dict]) -> str:
    """The whole report, as Markdown, from the results of :func:`bench.run.measure`."""
    by = {(r["config"], r["scale"]): r for r in results}
    lines = HEADER + [_row(r) for r in results] + _growth_notes(by)
    lines += TARGETS_HEADER + _targets(by)
    lines += _preprocess_notes(by) + _portable_notes(by) + _epoch_notes(by)
    return "\n".join(lines)


def percent(share: float) -> str:
    """A share as a percentage with one decimal, rounded down, so that a value shown as 90.0% meets a 90%
    target (0.89996 shows as 89.9%)."""
    return f"{math.floor(share * 1000 + 1e-9) / 10:.1f}%"


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def _row(r: dict) -> str:
    return (
        f"| {r['config']} | {r['rows']} | {r['prepare_images_s']:.0f} | {r['bytes_per_sample']:.0f} "
        f"({r['float32_bytes_per_sample']}, 1/{r['float32_bytes_per_sample'] / r['bytes_per_sample']:.0f}) "
        f"| {r['train_samples_s']:.1f} ({r['train_samples_s_baseline']:.1f}, "
        f"{r['train_samples_s'] / r['train_samples_s_baseline']:.1f}x) "
        f"| {r['infer_images_s']:.1f} ({r['infer_images_s_baseline']:.1f}, "
        f"{r['infer_images_s'] / r['infer_images_s_baseline']:.1f}x) "
        f"| {r['infer_images_s_bf16']:.1f} ({r['infer_images_s_bf16'] / r['infer_images_s_baseline']:.1f}x) "
        f"| {r['peak_mb_prepare']:.0f} / {r['peak_mb_train']:.0f} / {r['peak_mb_infer']:.0f} |"
    )


def _sizes(by: dict) -> list[tuple[str, dict, dict]]:
    """(config, its run at N, its run at 4N) for each config measured at both sizes."""
    pairs = ((config, by.get((config, 1)), by.get((config, 4))) for config in CONFIGS)
    return [(config, small, large) for config, small, large in pairs if small and large]


def _growth(small: dict, large: dict, stage: str) -> float:
    """How much a stage's peak memory grows from N to 4N, in percent."""
    return 100 * (large[f"peak_mb_{stage}"] / small[f"peak_mb_{stage}"] - 1)


def _growth_notes(by: dict) -> list[str]:
    return [
        f"\nPeak memory from N to 4N ({config}): "
        + ", ".join(f"{stage} {_growth(small, large, stage):+.0f}%" for stage in STAGES)
        + "."
        for config, small, large in _sizes(by)
    ]


# ---------------------------------------------------------------- targets


def _targets(by: dict) -> list[str]:
    """The targets table's rows: per run, then memory growth per config, then the demo epochs."""
    lines = []
    for (config, scale), r in sorted(by.items()):
        if config == "paper":
            lines += [_inference_target(r, scale, precision) for precision in ("auto", "bf16")]
            lines.append(_training_target(r, scale))
        if "detect_s" in r:
            lines.append(_detect_target(config, r))
        if "big_png_detect_mb" in r:
            lines += _decode_targets(config, r)
        lines.append(_storage_target(config, scale, r))
    for config, small, large in _sizes(by):
        for stage in STAGES:
            g = _growth(small, large, stage)
            lines.append(f"| peak memory of {stage} grows < 20% from N to 4N ({config}) | {g:+.0f}% | {_met(g < 20)} |")
    demo = by.get(("demo", 1))
    if demo and "epoch_s_full" in demo:
        f = demo["epoch_s_full"] / demo["epoch_s_frozen"]
        lines.append(f"| frozen-encoder epoch >= 20x faster than full (demo) | {f:.0f}x | {_met(f >= 20)} |")
    return lines


def _inference_target(r: dict, scale: int, precision: str) -> str:
    suffix = "" if precision == "auto" else f"_{precision}"
    share = r[f"infer_of_ceiling{suffix}"]
    low, high = r[f"infer_of_ceiling{suffix}_range"]
    rate = r[f"infer_images_s{suffix}"]
    return (
        f"| inference >= 90% of the vision encoder alone (paper, x{scale}, precision {precision}) "
        f"| {percent(share)} (median of {r[f'infer_of_ceiling{suffix}_rounds']} paired rounds, "
        f"range {100 * low:.0f}-{100 * high:.0f}%; "
        f"medians {rate:.1f} and {r[f'vision_only_images_s{suffix}']:.1f} img/s; "
        f"{rate / r['infer_images_s_baseline']:.1f}x batch-1) "
        f"| {_met(share >= 0.9)} |"
    )


def _training_target(r: dict, scale: int) -> str:
    train = r["train_samples_s"] / r["train_samples_s_baseline"]
    return f"| training >= 2x 128-padding (paper, x{scale}) | {train:.1f}x | {_met(train >= 2)} |"


def _detect_target(config: str, r: dict) -> str:
    default = r.get("detect_default_s", r["detect_s"])  # results from before the default was timed: the portable
    return (
        f"| `aigid detect one.jpg` <= 1 s, whole process ({config} model, the default it picks) "
        f"| {default:.2f} s (`--model` portable: {r['detect_s']:.2f} s; torch model: {r['detect_torch_s']:.2f} s; "
        f"`aigid detect --help`: {r['detect_import_s']:.2f} s) | {_met(default <= 1)} |"
    )


def _decode_targets(config: str, r: dict) -> list[str]:
    peaks = ", ".join(f"{name} {r[f'big_png_{name}_mb']:.0f} MB" for name in ("detect", "pyfunc", "page"))
    rate = r["photos_detect_images_s"]
    return [
        f"| peak memory <= 1 GB, whole process, 6 PNGs of 9000x9000 ({config} model, portable) | {peaks} "
        f"| {_met(max(r[f'big_png_{n}_mb'] for n in ('detect', 'pyfunc', 'page')) <= 1024)} |",
        f"| `aigid detect` >= 100 img/s on 120 random 1024x768 JPEGs, whole process ({config} model, portable) "
        f"| {rate:.0f} img/s (reduced decoding against whole: P(AI) within "
        f"{r['reduced_max_prob_ai_difference']:.1e}, generator labels agree on "
        f"{100 * r['reduced_label_agreement']:.0f}%) | {_met(rate >= 100)} |",
    ]


def _storage_target(config: str, scale: int, r: dict) -> str:
    ratio = r["float32_bytes_per_sample"] / r["bytes_per_sample"]
    return f"| stored bytes <= 1/20 of float32 ({config}, x{scale}) | 1/{ratio:.0f} | {_met(ratio >= 20)} |"


# ---------------------------------------------------------------- notes


def _preprocess_notes(by: dict) -> list[str]:
    return [
        f"\nImage preprocessing ({config}, {r['preprocess_backend']}), images/s per worker process "
        f"(one thread): {r['preprocess_images_s_stored']:.0f} on the stored "
        f"{CONFIGS[config]['image_size']} px images, {r['preprocess_images_s_jpeg1024']:.0f} on "
        f"1024 px JPEGs; workers to feed 10,000 img/s: "
        f"{math.ceil(10_000 / r['preprocess_images_s_stored'])} and "
        f"{math.ceil(10_000 / r['preprocess_images_s_jpeg1024'])}."
        for (config, _scale), r in sorted(by.items())
        if "preprocess_images_s_stored" in r
    ]


def _portable_notes(by: dict) -> list[str]:
    return [
        f"\nPortable detector ({config}, onnxruntime, float32, batch 64): {r['portable_images_s']:.1f} "
        f"img/s on the pool split (torch float32: {r['infer_images_s']:.1f}); the export's check on "
        f"{r['export_rows']} test rows: logits within {r['export_graph_max_logit_difference']:.1e} of "
        f"torch's on the same inputs, P(AI) within {r['export_max_prob_ai_difference']:.1e} of the "
        f"torch detector's, labels agree on {100 * r['export_label_agreement']:.0f}%."
        for (config, _scale), r in sorted(by.items())
        if "portable_images_s" in r
    ]


def _epoch_notes(by: dict) -> list[str]:
    demo = by.get(("demo", 1))
    if not (demo and "epoch_s_full" in demo):
        return []
    return [
        f"\nOne epoch on the demo train split ({demo['train_rows']} rows): full fine-tuning "
        f"{demo['epoch_s_full']:.3f} s, frozen encoders {demo['epoch_s_frozen']:.3f} s "
        f"({demo['epoch_s_full'] / demo['epoch_s_frozen']:.0f}x faster). With the Trainer's start-up, "
        f"the same for both: {demo['epoch_wall_s_full']:.2f} s and {demo['epoch_wall_s_frozen']:.2f} s. "
        f"The one-off feature extraction took {demo['feature_extraction_s']:.2f} s."
    ]
