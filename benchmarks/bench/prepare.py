"""The data and encoders every other measurement reads, and the prepare stage's throughput and storage: images/s
of `aigid prepare` (the whole command) and stored bytes per sample against the float32 3xHxW tensor per image
that the reference implementation stored (H = W = the image processor's crop size)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import AIGID, CONFIGS, params, params_file, stage_options, time_process


def child_source(work: Path, config: str, scale: int, seed: int = 0) -> dict:
    """The demo generator's captions and images at ``scale`` times the config's size N, saved as the source."""
    from aigid.sources.demo import generate_demo

    cfg = CONFIGS[config]
    raw = generate_demo({k: v * scale for k, v in cfg["captions"].items()}, cfg["image_size"], seed)
    raw.save_to_disk(str(work / "source"))
    return {"rows": sum(len(d) for d in raw.values())}


def child_prepare(work: Path, crop: int) -> dict:
    """`aigid prepare` on the source, as params.yaml configures it (Arrow layout): images/s and peak memory of the
    whole command (its start-up included), and the stored bytes per sample from its report."""
    update = {"source": str(work / "source"), "layout": "arrow"}
    paths = {"raw": work, "out": work / "prepared", "report": work / "prepare.json", "quarantine": work / "q.csv"}
    cmd = [AIGID, "prepare", "--params", str(params_file(work / "params.yaml", prepare=update)), *stage_options(paths)]
    wall, _, peak = time_process(cmd)
    report = json.loads(paths["report"].read_text())
    rows = sum(s["rows"] for s in report["splits"].values())
    return {
        "prepare_images_s": rows / wall,
        "bytes_per_sample": report["bytes_per_sample"],
        "float32_bytes_per_sample": 3 * crop * crop * 4,
        "peak_mb_prepare": peak,
    }


def child_encoders(work: Path, config: str) -> dict:
    from aigid.core.data import open_dataset

    build_encoders(work / "encoders", config, open_dataset(work / "prepared")["train"]["Caption"])
    return {}


def build_encoders(out: Path, config: str, captions) -> None:
    """Demo encoders as the pipeline builds them; paper-size ones from their configs (random weights), so that
    the benchmark runs offline."""
    if config == "demo":  # the embedded default's encoders, as params.yaml sizes them
        from aigid.sources.demo import build_demo_encoders

        build_demo_encoders(captions, params().encoders, out, 0)
    else:
        _paper_encoders(out, captions)


def _paper_encoders(out: Path, captions) -> None:
    """BERT-base and CLIP ViT-B/32 sizes, randomly initialised; a WordPiece vocabulary from the captions."""
    from transformers import BertConfig, BertModel, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from aigid.sources.demo import train_wordpiece

    tokenizer = train_wordpiece(captions, 1000)
    BertModel(BertConfig(vocab_size=30522), add_pooling_layer=False).save_pretrained(out / "text")
    tokenizer.save_pretrained(out / "text")
    vision = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        image_size=224,
        patch_size=32,
    )
    CLIPVisionModel(vision).save_pretrained(out / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        out / "vision"
    )
