import pytest
import yaml

from aigid.config import ParamsError, flatten, load_params


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_committed_params_load_and_flatten():
    p = load_params("params.yaml")
    flat = flatten(p)
    assert flat["threshold"] == p.threshold and "train.learning_rate" in flat


def test_numbers_in_any_yaml_spelling_are_accepted(tmp_path):
    p = load_params(write(tmp_path, "train:\n  learning_rate: 2e-5\n"))   # a string to a YAML 1.1 reader
    assert p.train.learning_rate == pytest.approx(2e-5)


@pytest.mark.parametrize("text, key", [
    ("threshold: 1.5\n", "threshold"),
    ("threshold: high\n", "threshold"),
    ("train:\n  epochs: 2.5\n", "train.epochs"),
    ("train:\n  batch_size: 0\n", "train.batch_size"),
    ("pseudolabel:\n  pool: validation\n", "pseudolabel.pool"),
    ("train:\n  lr: 0.1\n", "train.lr"),
    ("inference:\n  precision: fp16\n", "inference.precision"),
    ("encoders:\n  demo:\n    hidden_size: 30\n    heads: 4\n", "encoders.demo.hidden_size"),
])
def test_bad_values_name_their_key(tmp_path, text, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(write(tmp_path, text))
