"""params.yaml: complete, typed, checked; each stage reads only the keys it declares."""

import pytest
import yaml
from click.testing import CliRunner

from aigid.cli import main
from aigid.core.config import ParamsError, Train, declared, flatten, load_params, view
from helpers import REPO, write


def test_committed_params_load_and_flatten():
    p = load_params(REPO / "params.yaml")
    flat = flatten(p)
    assert flat["threshold"] == p.threshold and flat["train.learning_rate"] == 0.002
    assert flat["prepare.class_aliases.coco"] == "real"


@pytest.mark.parametrize("spelling, value", [("2e-5", 2e-5), ("2.0e-5", 2e-5), ("1E-3", 1e-3), ("1", 1.0), (".5", 0.5)])
def test_numbers_in_any_yaml_spelling_are_accepted(tmp_path, spelling, value):
    text = (REPO / "params.yaml").read_text().replace("learning_rate: 0.002", f"learning_rate: {spelling}")
    p = load_params(write(tmp_path, text=text))  # 2e-5 is a string to a YAML 1.1 reader, a number to DVC's
    assert type(p.train.learning_rate) is float and p.train.learning_rate == pytest.approx(value)


@pytest.mark.parametrize(
    "over, line",
    [
        ({"train": {"batch_size": True}}, "train.batch_size: Input should be a valid integer, got True"),
        ({"train": {"epochs": True}}, "train.epochs: Input should be a valid integer, got True"),
        ({"train": {"epochs": "8"}}, "train.epochs: Input should be a valid integer, got '8'"),
        ({"train": {"epochs": 8.0}}, "train.epochs: Input should be a valid integer, got 8.0"),
        ({"seed": "42"}, "seed: Input should be a valid integer, got '42'"),
        ({"compute": {"threads": False}}, "compute.threads: Input should be a valid integer, got False"),
        ({"prepare": {"demo": {"captions": {"train": True}}}}, "prepare.demo.captions.train: Input should be a valid"),
        ({"train": {"warmup_ratio": False}}, "train.warmup_ratio: Input should be a valid number, got False"),
        ({"train": {"learning_rate": "0.5"}}, "train.learning_rate: Input should be a valid number, got '0.5'"),
        ({"train": {"learning_rate": float("inf")}}, "train.learning_rate: Input should be a finite number"),
        ({"evaluate": {"robustness": {"blur": [True]}}}, "evaluate.robustness.blur[0]: Input should be a valid number"),
        ({"train": {"freeze_encoders": 1}}, "train.freeze_encoders: Input should be a valid boolean, got 1"),
        ({"train": {"freeze_encoders": "yes"}}, "train.freeze_encoders: Input should be a valid boolean, got 'yes'"),
    ],
)
def test_a_value_of_another_type_is_refused_naming_its_key(tmp_path, over, line):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, over))
    assert str(err.value).startswith(f"{tmp_path / 'params.yaml'}: {line}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "over, key",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"train": {"epochs": 2.5}}, "train.epochs"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"pseudolabel": {"pool": "validation"}}, "pseudolabel.pool"),
        ({"inference": {"precision": "fp16"}}, "inference.precision"),
        ({"encoders": {"demo": {"hidden_size": 30, "heads": 4}}}, "encoders.demo"),
        ({"evaluate": {"robustness": {"jpeg": 95}}}, "evaluate.robustness"),
        ({"prepare": {"class_aliases": {"x_image": "sd4"}}}, "prepare"),
        ({"train": {"holdout": "sd4"}}, "train.holdout"),
    ],
)
def test_bad_values_name_their_key(tmp_path, over, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(write(tmp_path, over))


def test_unknown_key_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown key train\.learning_rat \(did you mean train\.learning_rate\?\)"):
        load_params(write(tmp_path, {"train": {"learning_rat": 0.1}}))


@pytest.mark.parametrize("text", ["", "# nothing set\n", "[]\n"])
def test_an_empty_params_file_is_refused(tmp_path, text):
    with pytest.raises(ParamsError, match="must set every key"):
        load_params(write(tmp_path, text=text))


def test_a_partial_params_file_names_every_missing_key(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["train"]["epochs"], params["mlflow"], params["prepare"]["revision"]
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, text=yaml.safe_dump(params)))
    assert "missing key(s)" in str(err.value)
    for key in ("train.epochs", "mlflow", "prepare.revision"):
        assert key in str(err.value)


def test_a_stage_reads_only_its_declared_keys():
    p = load_params(REPO / "params.yaml")
    seen = view(p, ("seed", "train.num_workers", "inference"))
    assert seen.seed == 42 and seen.train.num_workers == 0 and seen.inference.precision == "auto"
    assert seen.inference is p.inference  # a whole group is params.yaml's own model, typed
    with pytest.raises(ParamsError, match=r"train\.epochs.*does not declare"):
        seen.train.epochs
    with pytest.raises(ParamsError, match=r"threshold"):
        seen.threshold
    assert not hasattr(seen, "threshold")
    assert seen.declared() == {"seed": 42, "train.num_workers": 0, "inference.precision": "auto"}
    assert seen.train.declared() == {"train.num_workers": 0}
    with pytest.raises(ValueError):
        seen.seed = 1  # read-only
    whole = view(p, ("train",))
    assert isinstance(whole.train, Train) and whole.declared() == declared(p, ("train",))
    assert declared(p, ("model",)) == {"model.fusion": "concat", "model.fusion_dim": 512, "model.max_text_length": 64}


@pytest.mark.parametrize(
    "over, key",
    [
        ({"train": {"caption_dropout": 1}}, "train.caption_dropout"),
        ({"train": {"holdout": "real"}}, "train.holdout"),
        ({"train": {"holdout": "flux"}}, "train.holdout"),
        ({"evaluate": {"target_fpr": 0}}, "evaluate.target_fpr"),
        ({"evaluate": {"robustness": {"blur": [1, "x"]}}}, r"evaluate.robustness.blur.1"),
        ({"evaluate": {"robustness": {"resize": 0.5}}}, "evaluate.robustness.resize"),
    ],
)
def test_new_params_are_checked(tmp_path, over, key):
    with pytest.raises(ParamsError, match=key):
        load_params(write(tmp_path, over))


def test_holdout_accepts_a_generator(tmp_path):
    p = load_params(write(tmp_path, {"train": {"holdout": "sd3"}, "evaluate": {"robustness": {"blur": [1, 2.5]}}}))
    assert p.train.holdout == "sd3" and p.evaluate.robustness["blur"] == [1.0, 2.5]


def test_malformed_params_value_names_the_key(tmp_path):
    params = yaml.safe_load(open("params.yaml"))
    params["train"]["learning_rate"] = "fast"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            str(tmp_path),
            "--encoders",
            str(tmp_path),
            "--out",
            str(tmp_path / "model"),
        ],
    )
    assert result.exit_code != 0
    assert "train.learning_rate: Input should be a valid number" in result.output and "'fast'" in result.output
    assert not (tmp_path / "model").exists()
