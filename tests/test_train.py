"""Training (aigid.training.trainer, aigid.training.fit) and the `train` and `retrain` stages: caption dropout on
the training rows only, held-out classes, the global batch shared by processes, complete checkpoints and resuming
from one."""

import json

import pytest
import torch

from aigid.core.config import ParamsError
from aigid.training.trainer import (
    MARK,
    DropCaptions,
    MarkComplete,
    drop_class,
    is_complete,
    per_process_batch,
    resumable_checkpoint,
)


def test_caption_dropout_rate_and_determinism_on_the_training_rows_only_and_holdout_drops_its_class():
    from datasets import Dataset

    ds = Dataset.from_dict({"Caption": [f"caption {i}" for i in range(4000)], "Label_B": [0, 3, 1, 2] * 1000})
    training = ds.with_transform(DropCaptions(0.1))
    batches = []
    for _ in range(2):
        torch.manual_seed(1)
        batches.append([r["Caption"] for r in training.__getitems__(list(range(4000)))])  # one batch, one call
    assert batches[0] == batches[1]
    assert 0.08 < batches[0].count("") / 4000 < 0.12
    assert all(c in ("", f"caption {i}") for i, c in enumerate(batches[0]))
    assert ds["Caption"][:3] == ["caption 0", "caption 1", "caption 2"]  # the rows themselves (validation) keep theirs
    names = ("real", "sd21", "sdxl", "sd3")
    assert drop_class(ds.select(range(4)), names, "sd3")["Caption"] == ["caption 0", "caption 2", "caption 3"]
    with pytest.raises(ValueError, match="train.holdout='flux'"):
        drop_class(ds, names, "flux")


def test_global_batch_is_shared_by_the_processes():
    assert per_process_batch(256, 1) == 256 and per_process_batch(256, 8) == 32
    with pytest.raises(ParamsError, match=r"train\.batch_size: 30 .* 4 processes"):
        per_process_batch(30, 4)


def test_a_checkpoint_is_resumed_only_when_every_process_marked_it_for_the_same_fingerprint(tmp_path):
    def checkpoint(step: int, ranks: range, key: str = "abc"):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        for rank in ranks:
            (folder / MARK.format(rank=rank)).write_text(json.dumps({"fingerprint": key}))

    checkpoint(5, range(2))
    checkpoint(10, range(1))  # rank 1 killed before it marked its part
    assert resumable_checkpoint(tmp_path, "abc", 2) == str(tmp_path / "checkpoint-5")
    assert not (tmp_path / "checkpoint-10").exists()
    assert not is_complete(tmp_path / "checkpoint-5", "other", 2)  # another fingerprint's checkpoint
    assert resumable_checkpoint(tmp_path, "abc", 3) is None and not (tmp_path / "checkpoint-5").exists()
    assert resumable_checkpoint(tmp_path / "none", "abc") is None


@pytest.mark.slow
def test_frozen_training_killed_after_a_checkpoint_resumes_to_the_same_model(frozen, tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file
    from transformers import Trainer

    from aigid.core.config import load_params, view
    from aigid.stages import train
    from aigid.training.fit import fit

    class Killed(Exception):
        pass

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise Killed

    monkeypatch.chdir(tmp_path)  # the MLflow store of these runs
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    params = view(load_params(frozen / "params.yaml"), train.PARAMS)

    def run(out: str, checkpoints: str):
        paths = train.Paths(
            data=frozen / "data/prepared",
            encoders=frozen / "models/encoders",
            features=frozen / "data/features",
            out=tmp_path / out,
        )
        return fit(params, paths, checkpoint_dir=tmp_path / checkpoints)

    save = MarkComplete.on_save  # the first checkpoint is saved and marked complete, then the run dies
    monkeypatch.setattr(MarkComplete, "on_save", save_then_die)
    with pytest.raises(Killed):
        run("killed", "ck")
    monkeypatch.setattr(MarkComplete, "on_save", save)
    (checkpoint,) = (tmp_path / "ck").glob("*/checkpoint-*")
    assert is_complete(checkpoint, checkpoint.parent.name, 1)
    assert {k.split(".")[0] for k in load_file(checkpoint / "model.safetensors")} == {"fusion", "head_a", "head_b"}

    steps = []
    step = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **kw: steps.append(1) or step(self, *a, **kw))
    with caplog.at_level("INFO", logger="aigid.training.trainer"):
        resumed = run("killed", "ck")
    assert "resuming train from the last checkpoint" in caplog.text
    resumed_steps, steps[:] = len(steps), []
    unbroken = run("unbroken", "ck2")
    assert resumed_steps == len(steps) * (params.train.epochs - 1) / params.train.epochs  # only the epochs left
    resumed_rule, unbroken_rule = resumed["metrics"].pop("scoring"), unbroken["metrics"].pop("scoring")
    assert resumed["metrics"] == pytest.approx(unbroken["metrics"])
    assert resumed_rule == pytest.approx(unbroken_rule)  # the same model, so the same scoring rule
    assert len(resumed["history"]) == params.train.epochs
    for epoch_resumed, epoch_unbroken in zip(resumed["history"], unbroken["history"]):
        assert epoch_resumed == pytest.approx(epoch_unbroken)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("killed", "unbroken"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)  # the complete detector
