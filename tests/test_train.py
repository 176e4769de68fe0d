"""The `train` and `retrain` stages (aigid.stages.train): the training loader, held-out classes, the global batch
shared by processes, complete checkpoints and resuming from one."""

import pytest
import torch

from aigid.core.config import ParamsError
from aigid.stages.train import CHECKPOINT_FILES, checkpoint_files, last_complete_checkpoint, per_process_batch
from helpers import _Recorder, _tiny_detector


def test_only_the_training_loader_drops_captions_and_holdout_drops_its_class(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from aigid.stages.train import DetectorTrainer, drop_class

    ds = Dataset.from_dict({"Caption": ["a", "b", "c"], "Label_A": [0, 1, 1], "Label_B": [0, 3, 1]})
    evaluation, training = _Recorder(), _Recorder()
    trainer = DetectorTrainer(
        model=_tiny_detector(),
        train_dataset=ds,
        eval_dataset=ds,
        data_collator=evaluation,
        train_collator=training,
        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], remove_unused_columns=False),
    )
    assert trainer.get_train_dataloader().collate_fn is training
    assert trainer.get_eval_dataloader().collate_fn is evaluation and trainer.data_collator is evaluation
    names = ("real", "sd21", "sdxl", "sd3")
    assert drop_class(ds, names, "sd3")["Caption"] == ["a", "c"]
    with pytest.raises(ValueError, match="train.holdout='flux'"):
        drop_class(ds, names, "flux")


def test_global_batch_is_shared_by_the_processes():
    assert per_process_batch(256, 1) == 256 and per_process_batch(256, 8) == 32
    with pytest.raises(ParamsError, match=r"train\.batch_size: 30 .* 4 processes"):
        per_process_batch(30, 4)


def test_a_complete_checkpoint_holds_every_rank_rng_state(tmp_path):
    assert checkpoint_files(1) == CHECKPOINT_FILES
    assert "rng_state.pth" not in checkpoint_files(2)
    for step, files in ((5, checkpoint_files(2)), (10, checkpoint_files(2)[:-1])):  # rank 1 killed before its RNG
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in files:
            (tmp_path / f"checkpoint-{step}" / name).write_bytes(b"")
    assert last_complete_checkpoint(tmp_path, 2) == tmp_path / "checkpoint-5"
    assert not (tmp_path / "checkpoint-10").exists()
    assert last_complete_checkpoint(tmp_path, 1) is None  # single-process files are not there


@pytest.mark.slow
def test_frozen_training_killed_after_a_checkpoint_resumes_to_the_same_model(frozen, tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file
    from transformers import Trainer

    from aigid.core.config import load_params, scoped
    from aigid.stages import train
    from aigid.stages.train import CHECKPOINT_FILES, fit

    class Killed(Exception):
        pass

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise Killed

    monkeypatch.chdir(tmp_path)  # the MLflow store of these runs
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    params = scoped(load_params(frozen / "params.yaml"), train.PARAMS)

    def run(out: str, checkpoints: str):
        paths = train.Paths(
            data=frozen / "data/prepared",
            encoders=frozen / "models/encoders",
            features=frozen / "data/features",
            out=tmp_path / out,
        )
        return fit(params, paths, checkpoint_dir=tmp_path / checkpoints)

    save = Trainer._save_checkpoint
    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run("killed", "ck")
    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    (checkpoint,) = (tmp_path / "ck").glob("*/checkpoint-*")
    assert all((checkpoint / name).is_file() for name in CHECKPOINT_FILES)
    assert {k.split(".")[0] for k in load_file(checkpoint / "model.safetensors")} == {"fusion", "head_a", "head_b"}

    steps = []
    step = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **kw: steps.append(1) or step(self, *a, **kw))
    with caplog.at_level("INFO", logger="aigid.stages.train"):
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
