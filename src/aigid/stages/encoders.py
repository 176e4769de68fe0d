"""The `encoders` stage: put the two starting encoders into one local directory.

With a hub name or a local directory, the encoder is loaded with ``from_pretrained`` and written back with
``save_pretrained``, which pins the exact weights the pipeline trains from as a versioned DVC output. With
``demo``, a small BERT and a small CLIP vision model are built from configs (random weights), with a WordPiece
tokenizer trained on the training captions, so the whole pipeline runs offline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from aigid.core import stage
from aigid.core.data import open_dataset
from aigid.core.errors import DataError
from aigid.core.files import atomic_path
from aigid.detector.runtime import configure

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PARAMS = ("seed", "encoders", "compute")


@dataclass(frozen=True)
class Paths:
    data: Path = stage.path(
        "data/prepared", "Prepared dataset; its train captions train the demo tokenizer.", exists=True
    )
    out: Path = stage.path("models/encoders", "Directory for the text/ and vision/ encoders.")


def run(params, paths: Paths) -> dict:
    """Write the starting text and vision encoders to OUT/text and OUT/vision.

    encoders.text / encoders.vision may be hub names or local directories (loaded with from_pretrained and
    saved again, pinning them), or `demo` (small encoders built from configs, for offline runs).
    """
    configure(params.compute)
    e = params.encoders
    with atomic_path(paths.out) as tmp:
        if e.text == "demo":  # both or neither (checked with the params)
            build_demo_encoders(open_dataset(paths.data)["train"]["Caption"], e, tmp, params.seed)
        else:
            snapshot_encoders(e, tmp)
    return {"text": e.text, "vision": e.vision}


command = stage.command("encoders", run, Paths, PARAMS)


def train_wordpiece(captions: Iterable[str], vocab_size: int) -> BertTokenizerFast:
    """A lowercasing BERT-style WordPiece tokenizer whose vocabulary comes from ``captions``.

    The vocabulary is built here rather than by the `tokenizers` trainer, whose order for equally frequent
    pieces varies from run to run: special tokens, every character alone and as a ``##`` continuation,
    then whole words by falling frequency (ties alphabetical). Same captions, same token ids.
    """
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    chars = sorted({ch for word in counts for ch in word})
    pieces = SPECIAL_TOKENS + chars + [f"##{ch}" for ch in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    pieces += words[: max(0, vocab_size - len(pieces))]
    tok = Tokenizer(models.WordPiece(vocab={p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        do_lower_case=True,
    )


def build_demo_encoders(captions: Iterable[str], params, out_dir: Path, seed: int) -> None:
    import torch

    d = params.demo
    torch.manual_seed(seed)
    tokenizer = train_wordpiece(captions, d.vocab_size)
    text = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=d.hidden_size,
            num_hidden_layers=d.layers,
            num_attention_heads=d.heads,
            intermediate_size=4 * d.hidden_size,
            max_position_embeddings=128,
        ),
        add_pooling_layer=False,
    )
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=d.hidden_size,
            num_hidden_layers=d.layers,
            num_attention_heads=d.heads,
            intermediate_size=4 * d.hidden_size,
            image_size=d.image_size,
            patch_size=d.patch_size,
            projection_dim=d.hidden_size,
        )
    )
    # Only its settings are saved (as a CLIPImageProcessor); aigid.detector.model.load_processor picks the fast variant.
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": d.image_size}, crop_size={"height": d.image_size, "width": d.image_size}
    )
    text.save_pretrained(out_dir / "text")
    tokenizer.save_pretrained(out_dir / "text")
    vision.save_pretrained(out_dir / "vision")
    processor.save_pretrained(out_dir / "vision")


def snapshot_encoders(params, out_dir: Path) -> None:
    """Copy pretrained encoders (hub names or local directories) into ``out_dir`` through from_pretrained."""
    for name, kind in ((params.text, "text"), (params.vision, "vision")):
        try:
            if kind == "text":
                model, pre = (
                    AutoModel.from_pretrained(name, add_pooling_layer=False),
                    AutoTokenizer.from_pretrained(name),
                )
            else:
                model, pre = (
                    CLIPVisionModel.from_pretrained(name),
                    AutoImageProcessor.from_pretrained(name),
                )  # settings only
        except OSError as err:
            raise DataError(
                f"encoders.{kind}={name!r} could not be loaded: it is neither a local directory nor a model in the "
                f"Hugging Face cache or hub reachable from here ({err})"
            ) from err
        except TypeError as err:  # a text model without a pooler option (DistilBERT): not BERT-like
            raise DataError(
                f"encoders.{kind}={name!r} is not an encoder the pipeline can read (a BERT-like text encoder, "
                f"a CLIP vision tower): {err}"
            ) from err
        model.save_pretrained(out_dir / kind)
        pre.save_pretrained(out_dir / kind)
