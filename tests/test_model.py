import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aigid.core.errors import DataError
from aigid.detector.model import (
    DetectorHeads,
    load_detector,
    multitask_loss,
    save_detector,
)
from aigid.detector.scores import decide
from helpers import CT2, _tiny_detector


def test_loss_is_bce_plus_ce_over_ai_images_only():
    logits_a = torch.tensor([0.3, -1.2, 2.0])
    logits_b = torch.tensor(
        [
            [5.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # real image: head B must be ignored
            [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 3.0, 0.0, 0.0],
        ]
    )
    labels_a, labels_b = torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3])
    bce = (
        -(
            math.log(1 - 1 / (1 + math.exp(-0.3)))
            + math.log(1 / (1 + math.exp(1.2)))
            + math.log(1 / (1 + math.exp(-2.0)))
        )
        / 3
    )
    ce_row1 = -(0.0 - math.log(5 + math.e))  # target 2, logits (0,1,0,0,0,0)
    ce_row2 = -(3.0 - math.log(5 + math.exp(3.0)))  # target 3
    expected = bce + (ce_row1 + ce_row2) / 2
    assert multitask_loss(logits_a, logits_b, labels_a, labels_b).item() == pytest.approx(expected, rel=1e-6)


def test_batch_without_ai_images_gives_zero_task_b_loss_and_no_head_b_gradient():
    logits_a = torch.tensor([0.5, -0.5], requires_grad=True)
    logits_b = torch.randn(2, 6, requires_grad=True)
    loss = multitask_loss(logits_a, logits_b, torch.tensor([0, 0]), torch.tensor([0, 0]))
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits_a, torch.zeros(2)).item())
    loss.backward()
    assert torch.count_nonzero(logits_b.grad) == 0
    assert torch.count_nonzero(logits_a.grad) == 2


def test_label_b_is_real_exactly_when_label_a_is_real():
    logits_a = torch.tensor([-3.0, 3.0, 0.1, -0.1])
    logits_b = torch.tensor([[9.0, 1, 2, 3, 4, 5], [9.0, 1, 2, 3, 4, 5], [0.0, 0, 0, 0, 7, 0], [0.0, 0, 8, 0, 0, 0]])
    p = decide(logits_a, logits_b)
    assert p.label_a.tolist() == [0, 1, 1, 0]
    # Class 0 of head B is never chosen for an AI prediction, even when its logit is the largest.
    assert p.label_b.tolist() == [0, 5, 4, 0]
    assert ((p.label_a == 0) == (p.label_b == 0)).all()
    assert p.conf_a[0].item() == pytest.approx(1 - 1 / (1 + math.exp(3.0)))
    assert p.conf_b[0] == p.conf_a[0]  # real: B follows from A
    assert (p.probs_b[:, 0] == 0).all() and np.allclose(p.probs_b.sum(-1), 1)


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    from transformers import CLIPImageProcessor

    from aigid.sources.demo import train_wordpiece

    torch.manual_seed(0)
    model = _tiny_detector().eval()
    tokenizer = train_wordpiece(["a red circle", "two blue squares on grass"], vocab_size=50)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    save_detector(model, tokenizer, processor, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not list((tmp_path / "m").glob("*.bin"))
    loaded, tok2, proc2, _ = load_detector(tmp_path / "m")
    enc = tok2(["a red circle", "blue"], padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(**tokenizer(["a red circle", "blue"], padding=True, return_tensors="pt"), pixel_values=pixels)
        b = loaded.eval()(**enc, pixel_values=pixels)
    assert torch.equal(a.logits_a, b.logits_a) and torch.equal(a.logits_b, b.logits_b)
    config = tmp_path / "m" / "config.json"  # a model saved before fusion was a choice
    saved = json.loads(config.read_text())
    del saved["fusion"]
    config.write_text(json.dumps(saved))
    assert load_detector(tmp_path / "m").model.config.fusion == "concat"


def test_load_refuses_a_directory_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(DataError, match="model.safetensors"):
        load_detector(tmp_path)


def test_a_class_added_in_params_gives_head_b_one_more_output():
    from aigid.tracking.metrics import score

    names = (*CT2, "flux")
    model = _tiny_detector(class_names=names)
    assert model.head_b.out_features == 7
    logits_b = torch.zeros(2, 7)
    logits_b[:, 6] = 5.0
    p = decide(torch.tensor([3.0, -3.0]), logits_b)
    assert p.label_b.tolist() == [6, 0]
    s = score([1, 0], [6, 0], p.label_a, p.label_b, names)
    assert s["per_class"]["flux"]["task_b_recall"] == 1.0


def test_each_distinct_caption_is_encoded_once_with_the_same_result():
    torch.manual_seed(0)
    model = _tiny_detector().eval()
    ids = torch.tensor([[2, 7, 9, 3, 0], [2, 8, 3, 0, 0], [2, 7, 9, 3, 0], [2, 7, 9, 4, 3]])
    mask = (ids != 0).long()
    pixels = torch.randn(4, 3, 16, 16)
    seen = []
    model.text_encoder.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    with torch.no_grad():
        text, image = model.encode(ids, mask, pixels)
        alone = [
            model.text_encoder(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).last_hidden_state[:, 0]
            for i in range(4)
        ]
    assert seen[0] == 3  # rows 0 and 2 share a caption
    assert torch.allclose(text, torch.cat(alone), atol=1e-5)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    from_features = model(text_features=text, image_features=image)
    assert torch.allclose(out.logits_a, from_features.logits_a) and torch.allclose(out.logits_b, from_features.logits_b)


def test_frozen_encoders_get_no_gradient():
    model = _tiny_detector()
    model.freeze_encoders()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fusion", "head_a", "head_b"}


def test_training_the_heads_module_trains_the_detector_and_it_holds_nothing_else():
    torch.manual_seed(0)
    model = _tiny_detector()
    heads = DetectorHeads(model)
    text, image = torch.randn(5, 16), torch.randn(5, 16)
    labels_a, labels_b = torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 2, 5, 1, 0])
    before = model(text_features=text, image_features=image, labels_a=labels_a, labels_b=labels_b)
    out = heads(text_features=text, image_features=image, labels_a=labels_a, labels_b=labels_b)
    assert torch.equal(out.logits_a, before.logits_a) and torch.equal(out.loss, before.loss)
    assert set(heads.state_dict()) == {
        k for k in model.state_dict() if k.split(".")[0] in ("fusion", "head_a", "head_b")
    }
    out.loss.backward()
    torch.optim.SGD(heads.parameters(), lr=0.5).step()
    after = model(text_features=text, image_features=image, labels_a=labels_a, labels_b=labels_b)
    assert after.loss < before.loss  # the step on the heads module moved the detector
    heads.load_state_dict({k: torch.zeros_like(v) for k, v in heads.state_dict().items()})
    assert torch.count_nonzero(model.head_b.weight) == 0  # loading a checkpoint into it loads the detector


def _smooth_images(count: int) -> list:
    """Photo-like images (smooth gradients and a disc) of varied sizes and aspect ratios."""
    import numpy as np
    from PIL import Image

    images = []
    for k, (w, h) in enumerate([(224, 224), (300, 260), (640, 480), (1024, 768)][:count]):
        y, x = np.mgrid[0:h, 0:w]
        disc = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2) * 80
        rgb = np.stack([x * 255 / w, y * 255 / h, (x + y + 40 * k) % 256 * 0.5 + disc], -1)
        images.append(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)))
    return images


def test_fast_image_processor_matches_the_pil_one(tmp_path):
    """load_processor gives the torchvision-backed processor where torchvision is installed; its pixels agree with
    the PIL processor's to within 0.02 on average and 0.2 at any pixel (normalised units: one 8-bit level is about
    0.015 after CLIP's normalisation; the two bicubic resizes round differently)."""
    pytest.importorskip("torchvision")
    from transformers import CLIPImageProcessorPil

    from aigid.detector.model import load_processor

    CLIPImageProcessorPil().save_pretrained(tmp_path)
    fast = load_processor(tmp_path)
    assert fast.backend == "torchvision"
    images = _smooth_images(4)
    ours = fast(images=images, return_tensors="pt")["pixel_values"]
    pil = CLIPImageProcessorPil.from_pretrained(tmp_path)(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == pil.shape
    assert (ours - pil).abs().mean() <= 0.02
    assert (ours - pil).abs().max() <= 0.2


def test_processor_loads_without_the_fallback_warning(tmp_path):
    """Where torchvision is missing, building (encoders) and loading (load_processor) a processor falls back to
    the PIL one silently: no "requires torchvision ... falling back" warning in every stage's log."""
    import subprocess
    import sys

    code = (
        "import sys; from transformers import CLIPImageProcessorPil; import aigid.stages.encoders; "
        "from aigid.detector.model import load_processor; CLIPImageProcessorPil().save_pretrained(sys.argv[1]); "
        "print(load_processor(sys.argv[1]).backend)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() in ("torchvision", "pil")
    assert "requires torchvision" not in proc.stderr


def test_concat_fusion_keeps_the_paper_layer_and_cross_attention_reads_tokens_without_padding(tmp_path):
    from transformers import CLIPImageProcessor

    from aigid.sources.demo import train_wordpiece

    assert {k for k in _tiny_detector().state_dict() if k.startswith("fusion.")} == {"fusion.0.weight", "fusion.0.bias"}
    torch.manual_seed(0)
    model = _tiny_detector("cross_attention").eval()
    ids = torch.tensor([[2, 7, 9, 3], [2, 8, 3, 0]])
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens, _ = model.encode(ids, (ids != 0).long(), pixels, tokens=True)
        out = model(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=pixels)
        padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)  # more padding: same answer
        again = model(input_ids=padded, attention_mask=(padded != 0).long(), pixel_values=pixels)
        other = model(input_ids=ids[[1, 0]], attention_mask=(ids[[1, 0]] != 0).long(), pixel_values=pixels)
    assert tokens.shape == (2, 4, 16) and out.logits_b.shape == (2, 6)
    assert torch.allclose(out.logits_a, again.logits_a, atol=1e-5)
    assert not torch.allclose(out.logits_a, other.logits_a)  # the caption matters
    tokenizer = train_wordpiece(["a red circle", "two blue squares"], vocab_size=50)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    save_detector(model, tokenizer, processor, tmp_path / "m")
    loaded = load_detector(tmp_path / "m").model.eval()  # nothing but the directory
    assert loaded.config.fusion == "cross_attention"
    with torch.no_grad():
        b = loaded(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=pixels)
    assert torch.equal(out.logits_a, b.logits_a) and torch.equal(out.logits_b, b.logits_b)


def test_fusion_is_a_name_in_the_fusion_table(tmp_path):
    from aigid.core.config import ParamsError, load_params
    from aigid.detector.model import FUSIONS
    from helpers import write

    params = load_params(write(tmp_path, {"model": {"fusion": "cross_atention"}}))  # the table checks, where used
    with pytest.raises(
        ParamsError,
        match=r"model\.fusion: 'cross_atention' is not one of concat, cross_attention \(did you mean 'cross_",
    ):
        _tiny_detector(params.model.fusion)
    frozen = load_params(write(tmp_path, {"model": {"fusion": "cross_attention"}, "train": {"freeze_encoders": True}}))
    assert frozen.model.fusion in FUSIONS and frozen.train.freeze_encoders
