"""The `encoders` stage (aigid.stages.encoders): local pretrained directories snapshot offline, and the demo
tokenizer's vocabulary."""

import torch

from helpers import _tiny_detector


def test_encoders_stage_snapshots_local_pretrained_directories(tmp_path):
    """Hub names and local directories share one from_pretrained path; a local one runs offline."""
    import yaml
    from click.testing import CliRunner
    from transformers import CLIPImageProcessor

    from aigid.cli import main
    from aigid.detector.model import build_detector
    from aigid.sources.demo import train_wordpiece

    model = _tiny_detector()
    model.text_encoder.save_pretrained(tmp_path / "bert")
    train_wordpiece(["a red circle"], vocab_size=50).save_pretrained(tmp_path / "bert")
    model.vision_encoder.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        tmp_path / "clip"
    )
    params = yaml.safe_load(open("params.yaml"))
    params["encoders"].update(text=str(tmp_path / "bert"), vision=str(tmp_path / "clip"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(
        main,
        [
            "encoders",
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "enc"),
        ],
    )
    assert result.exit_code == 0, result.output
    detector, _, _, _ = build_detector(str(tmp_path / "enc/text"), str(tmp_path / "enc/vision"), 8, 16, ("real", "ai"))
    for name, tensor in model.text_encoder.state_dict().items():
        assert torch.equal(detector.text_encoder.state_dict()[name], tensor), name

    params["encoders"]["text"] = str(tmp_path / "missing")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(
        main,
        [
            "encoders",
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "enc2"),
        ],
    )
    assert result.exit_code != 0 and "encoders.text=" in result.output
    assert not (tmp_path / "enc2").exists()


def test_encoders_stage_refuses_a_text_encoder_that_is_not_bert_like(tmp_path):
    """DistilBERT loads with AutoModel but has no pooler to leave out: one line naming the key, no traceback."""
    import yaml
    from click.testing import CliRunner
    from transformers import DistilBertConfig, DistilBertModel

    from aigid.cli import main

    DistilBertModel(DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(tmp_path / "db")
    params = yaml.safe_load(open("params.yaml"))
    params["encoders"].update(text=str(tmp_path / "db"), vision=str(tmp_path / "db"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = str(tmp_path / "e")
    args = ["encoders", "--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path), "--out", out]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    assert "encoders.text=" in result.output and "BERT-like" in result.output, result.output
    assert not (tmp_path / "e").exists()


def test_demo_tokenizer_vocabulary_is_deterministic_and_covers_unseen_words():
    from aigid.sources.demo import train_wordpiece

    captions = ["two red circles and a blue square on a green background", "a yellow triangle on a grey background"]
    a, b = train_wordpiece(captions, 80), train_wordpiece(list(reversed(captions)) * 3, 80)
    assert a.get_vocab() == train_wordpiece(captions, 80).get_vocab()
    assert set(a.get_vocab()) == set(b.get_vocab())  # frequency ties are broken alphabetically
    assert "[UNK]" not in a.tokenize("a green triangles")  # unseen words fall back to characters
