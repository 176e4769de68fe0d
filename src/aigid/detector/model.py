"""The NAU-QMUL detector: BERT reads the caption, a CLIP vision encoder reads the image.

Their features are fused into a shared space and fed to two heads: Task A (real vs AI, one logit) and Task B
(which class of ``config.class_names``, prepare.class_names, made the image). The fusion is ``config.fusion``,
one of :data:`FUSIONS`: ``concat`` (the paper: concatenated and projected by one fully connected layer) or
``cross_attention`` (the image attends over the caption's tokens). A new fusion is one class in :data:`FUSIONS`.

A trained detector is one self-contained directory written by :func:`save_detector`: safetensors weights,
the detector config (which embeds both encoder configs), the tokenizer and the image processor.
:func:`load_detector` reads it back with nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from aigid.core.errors import DataError, choice
from aigid.detector.runtime import device, weights_for


class DetectorConfig(PretrainedConfig):
    model_type = "aigid-detector"

    # The encoder configs are plain dicts under their own names (not `text_config`/`vision_config`, which
    # transformers treats as nested config objects of a composite model).
    # A model saved before `fusion` existed has no such key and was trained with concat, the default.
    def __init__(
        self,
        text_encoder_config=None,
        vision_encoder_config=None,
        fusion_dim=512,
        class_names=(),
        max_text_length=64,
        fusion="concat",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.text_encoder_config = _as_dict(text_encoder_config)
        self.vision_encoder_config = _as_dict(vision_encoder_config)
        self.fusion_dim = fusion_dim
        self.fusion = fusion
        self.class_names = list(class_names)  # Label_B index -> name; index 0 is the real class
        self.max_text_length = max_text_length


# Known to the Auto classes, so that AutoTokenizer/AutoConfig can read a saved detector directory.
AutoConfig.register(DetectorConfig.model_type, DetectorConfig)


def _as_dict(cfg):
    return cfg.to_dict() if isinstance(cfg, PretrainedConfig) else cfg


@dataclass
class DetectorOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits_a: torch.Tensor | None = None
    logits_b: torch.Tensor | None = None


def multitask_loss(logits_a, logits_b, labels_a, labels_b):
    """BCE on Task A for every sample, plus cross-entropy on Task B for AI images only."""
    loss_a = F.binary_cross_entropy_with_logits(logits_a, labels_a.float())
    is_ai = labels_a == 1
    # Task B is defined only for AI images (Label_A == 1); a batch without any contributes exactly 0.
    loss_b = F.cross_entropy(logits_b[is_ai], labels_b[is_ai]) if is_ai.any() else logits_b.sum() * 0.0
    return loss_a + loss_b


class ConcatFusion(nn.Sequential):
    """The paper's fusion: [text [CLS]; image pooled] -> Linear -> ReLU (weights named fusion.0.*)."""

    tokens = False  # reads the caption's [CLS] feature only

    def __init__(self, text_dim: int, image_dim: int, out_dim: int, heads: int):
        super().__init__(nn.Linear(text_dim + image_dim, out_dim), nn.ReLU())

    def forward(self, text, image, text_mask=None):
        return super().forward(torch.cat([text, image], dim=-1))


class CrossAttentionFusion(nn.Module):
    """The image's pooled feature, projected into the text space, attends over the caption's token features
    (one multi-head attention layer, with the text encoder's number of heads; padding masked), residual and
    layer norm; then [attended; image pooled] -> Linear -> ReLU."""

    tokens = True  # reads every token feature of the caption and its attention mask

    def __init__(self, text_dim: int, image_dim: int, out_dim: int, heads: int):
        super().__init__()
        self.query = nn.Linear(image_dim, text_dim)
        self.attention = nn.MultiheadAttention(text_dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(text_dim)
        self.out = nn.Sequential(nn.Linear(text_dim + image_dim, out_dim), nn.ReLU())

    def forward(self, text, image, text_mask):
        query = self.query(image).unsqueeze(1)  # (batch, 1, text_dim)
        attended, _ = self.attention(query, text, text, key_padding_mask=text_mask == 0, need_weights=False)
        return self.out(torch.cat([self.norm(query + attended).squeeze(1), image], dim=-1))


# model.fusion -> the module; a new fusion is a class with the same constructor and forward and its name here.
# The params schema keeps model.fusion as a string: choice() checks it against this table where it is used.
FUSIONS = {"concat": ConcatFusion, "cross_attention": CrossAttentionFusion}


class Detector(PreTrainedModel):
    config_class = DetectorConfig
    base_model_prefix = "detector"
    main_input_name = "pixel_values"

    def __init__(self, config: DetectorConfig):
        super().__init__(config)
        text_cfg = dict(config.text_encoder_config)
        self.text_encoder = AutoModel.from_config(
            AutoConfig.for_model(text_cfg.pop("model_type"), **text_cfg), add_pooling_layer=False
        )
        self.vision_encoder = CLIPVisionModel(CLIPVisionConfig(**config.vision_encoder_config))
        self.fusion = choice(FUSIONS, config.fusion, "model.fusion")(
            self.text_encoder.config.hidden_size,
            self.vision_encoder.config.hidden_size,
            config.fusion_dim,
            self.text_encoder.config.num_attention_heads,
        )
        self.head_a = nn.Linear(config.fusion_dim, 1)
        self.head_b = nn.Linear(config.fusion_dim, len(config.class_names))
        self.post_init()

    def _init_weights(self, module):
        # Encoders come initialised (or loaded); only the fusion layers and heads are ours.
        ours = [m for m in self.fusion.modules() if hasattr(m, "reset_parameters")] + [self.head_a, self.head_b]
        if any(module is m for m in ours):
            module.reset_parameters()

    def encode(self, input_ids, attention_mask, pixel_values, token_type_ids=None, tokens=False, share_captions=True):
        """Text ([CLS], or with ``tokens`` every token's feature) and image (pooled) features, the encoders'
        whole contribution. ``share_captions=False`` encodes every row's caption, for a graph without
        data-dependent shapes (the ONNX export)."""
        text = self.encode_text(input_ids, attention_mask, token_type_ids, tokens, share_captions)
        return text, self.vision_encoder(pixel_values=pixel_values).pooler_output

    def encode_text(self, input_ids, attention_mask, token_type_ids=None, tokens=False, share_captions=True):
        """The text half of :meth:`encode`: each row's caption feature ([CLS], or every token's)."""
        if share_captions:  # the images of a caption share it: BERT reads each distinct caption of the batch once
            unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
            first = torch.full((len(unique),), len(input_ids), device=input_ids.device).scatter_reduce(
                0, inverse, torch.arange(len(input_ids), device=input_ids.device), reduce="amin"
            )
        else:
            unique, inverse, first = input_ids, slice(None), slice(None)
        text = self.text_encoder(
            input_ids=unique,
            attention_mask=attention_mask[first],
            token_type_ids=None if token_type_ids is None else token_type_ids[first],
        ).last_hidden_state
        return (text if tokens else text[:, 0])[inverse]  # [:, 0]: [CLS]

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        token_type_ids=None,
        text_features=None,
        image_features=None,
        text_mask=None,
        labels_a=None,
        labels_b=None,
        share_captions=True,
        **_,
    ):
        """From raw inputs, or from features cached by :meth:`encode` (frozen-encoder training; with a fusion
        that reads tokens, ``text_features`` are padded token features and ``text_mask`` marks the real ones)."""
        if text_features is None:
            tokens = self.fusion.tokens
            text_features, image_features = self.encode(
                input_ids, attention_mask, pixel_values, token_type_ids, tokens=tokens, share_captions=share_captions
            )
            text_mask = attention_mask if tokens else None
        return _heads(self, text_features, image_features, labels_a, labels_b, text_mask)

    def freeze_encoders(self) -> None:
        """Train only the fusion layer and the heads (the Trainer optimises parameters that require grad)."""
        for encoder in (self.text_encoder, self.vision_encoder):
            encoder.requires_grad_(False)
            encoder.eval()


class DetectorHeads(nn.Module):
    """A detector's fusion layer and two heads, the very same modules: training this trains the detector.

    Frozen-encoder training hands this to the Trainer instead of the whole detector, whose every step would
    otherwise switch modes, zero and clip gradients across all the encoders' parameters it never updates;
    its checkpoints hold only these weights (same names as in the detector).
    """

    def __init__(self, detector: Detector):
        super().__init__()
        self.fusion, self.head_a, self.head_b = detector.fusion, detector.head_a, detector.head_b

    def forward(self, text_features, image_features, labels_a=None, labels_b=None, text_mask=None, **_):
        return _heads(self, text_features, image_features, labels_a, labels_b, text_mask)


def _heads(
    model: Detector | DetectorHeads, text_features, image_features, labels_a, labels_b, text_mask=None
) -> DetectorOutput:
    """Fusion, both heads and the loss: the part of the forward pass shared by both modules."""
    shared = model.fusion(text_features, image_features, text_mask)
    logits_a = model.head_a(shared).squeeze(-1)
    logits_b = model.head_b(shared)
    loss = None if labels_a is None else multitask_loss(logits_a, logits_b, labels_a, labels_b)
    return DetectorOutput(loss=loss, logits_a=logits_a, logits_b=logits_b)


class Loaded(NamedTuple):
    """A detector with the tokenizer and image processor that prepare its inputs, and the inference precision
    it was loaded for (one of :data:`aigid.core.precision.PRECISIONS`: its passes run at it)."""

    model: Detector
    tokenizer: object
    processor: object
    precision: str = "fp32"


def build_detector(
    text_encoder: str,
    vision_encoder: str,
    fusion_dim: int,
    max_text_length: int,
    class_names: tuple[str, ...],
    fusion: str = "concat",
    precision: str = "fp32",
) -> Loaded:
    """A fresh detector from two pretrained encoders: hub names or local directories, same code path; ready to
    score at ``precision`` (float32 for training)."""
    text = AutoModel.from_pretrained(text_encoder, add_pooling_layer=False)
    vision = CLIPVisionModel.from_pretrained(vision_encoder)
    tokenizer = AutoTokenizer.from_pretrained(text_encoder)
    config = DetectorConfig(
        text_encoder_config=text.config,
        vision_encoder_config=vision.config,
        fusion_dim=fusion_dim,
        max_text_length=max_text_length,
        pad_token_id=tokenizer.pad_token_id,
        class_names=class_names,
        fusion=fusion,
    )
    model = Detector(config)
    model.text_encoder.load_state_dict(text.state_dict())
    model.vision_encoder.load_state_dict(vision.state_dict())
    return _for_precision(Loaded(model, tokenizer, load_processor(vision_encoder)), precision)


def load_processor(path: str | Path):
    """The image processor saved at ``path`` (or a hub name). transformers picks its fast (torchvision) variant
    where torchvision can be imported, else the PIL one, without a warning; the two agree within transformers'
    own tolerance (tests/test_model.py). Every processor the pipeline runs comes from here."""
    return AutoImageProcessor.from_pretrained(path)


def save_detector(model: Detector, tokenizer, processor, path: str | Path) -> None:
    """Write a detector directory. Its weights are float32: a model loaded to score in bf16 is refused, so that
    no detector is saved with rounded weights."""
    lowered = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if lowered:
        raise ValueError(
            f"cannot save a detector with {', '.join(lowered)} weights (loaded to score in bf16); "
            "save one loaded at precision fp32"
        )
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)


def load_detector(path: str | Path, precision: str = "auto") -> Loaded:
    """Load a directory written by :func:`save_detector` (safetensors only, never remote code), on the device
    the runtime picks, to score at ``precision`` (one of :data:`aigid.core.precision.PRECISIONS`)."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise DataError(f"{path}: no model.safetensors; not a detector directory written by train or retrain")
    model = Detector.from_pretrained(path, use_safetensors=True)
    return _for_precision(Loaded(model, AutoTokenizer.from_pretrained(path), load_processor(path)), precision)


def _for_precision(detector: Loaded, precision: str) -> Loaded:
    weights_for(detector.model, device(), precision)
    return detector._replace(precision=precision)
