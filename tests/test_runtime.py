"""Process-wide compute settings and the inference precision (aigid.detector.runtime): a bf16 pass stores the
weights autocast casts in bf16 once, and scores as autocast does on the float32 model."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from aigid.detector.model import load_detector, save_detector
from aigid.sources.demo import train_wordpiece
from helpers import _tiny_detector


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_a_detector_loaded_for_bf16_stores_the_weights_autocast_casts_in_bf16_and_scores_as_autocast(tmp_path, fusion):
    from aigid.core.data import Collator
    from aigid.detector.infer import RunOptions, predict_logits
    from aigid.detector.runtime import autocast

    torch.manual_seed(0)
    save_detector(
        _tiny_detector(fusion).eval(),
        train_wordpiece(["a red circle", "a blue square"], 50),
        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tmp_path / "model",
    )
    rng = np.random.default_rng(2)
    rows = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
        rows.append({"Caption": ["a red circle", "a blue square", ""][i % 3], "Image": {"bytes": buf.getvalue()}})
    cpu = torch.device("cpu")
    # The reference: the float32 model in one autocast region, which casts its weights as it goes.
    reference = load_detector(tmp_path / "model", "fp32")
    batch = Collator(reference.tokenizer, reference.processor, reference.model.config.max_text_length)(rows)
    with torch.inference_mode(), autocast(cpu, "bf16"):
        out = reference.model(**batch)
    want = out.logits_a.float().numpy(), out.logits_b.float().numpy()

    detector = load_detector(tmp_path / "model", "bf16")
    assert detector.precision == "bf16"
    dtypes = {name: p.dtype for name, p in detector.model.named_parameters()}
    linear = [n for n, m in detector.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(dtypes[f"{n}.weight"] == torch.bfloat16 for n in linear)
    assert dtypes["vision_encoder.embeddings.patch_embedding.weight"] == torch.bfloat16
    assert dtypes["text_encoder.embeddings.word_embeddings.weight"] == torch.float32
    assert dtypes["vision_encoder.post_layernorm.weight"] == torch.float32
    for _ in range(2):  # passes leave the model as loaded
        got = predict_logits(detector, rows, RunOptions(batch_size=6))
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert {name: p.dtype for name, p in detector.model.named_parameters()} == dtypes
    with pytest.raises(ValueError, match="cannot save a detector with torch.bfloat16 weights"):
        save_detector(detector.model, detector.tokenizer, detector.processor, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    for precision in ("auto", "fp32"):  # float32 on the CPU
        loaded = load_detector(tmp_path / "model", precision)
        assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
        predict_logits(loaded, rows, RunOptions(batch_size=6))
        assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
