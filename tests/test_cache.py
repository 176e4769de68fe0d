"""The feature cache of frozen-encoder mode (aigid.detector.cache), on the tiny pipeline run frozen (the
``frozen`` fixture, conftest.py): batches of cached rows, and scores from features equal to scores from images; and
the batch-by-batch writer of the features stage, which must give the rows the in-memory table gives."""

import numpy as np
import pytest
import torch


def _batches(order, text, image, size):
    """What iter_features yields: rows visited in ``order``, ``size`` at a time, with their features."""
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        yield rows, [text[i] for i in rows] if isinstance(text, list) else text[rows], image[rows]


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("visit", ["in order", "shuffled"])
def test_features_written_batch_by_batch_equal_the_table_made_in_memory(tmp_path, tokens, visit):
    from datasets import Dataset

    from aigid.core.data import open_dataset, save_dataset
    from aigid.detector.cache import feature_table, write_features

    rng = np.random.default_rng(0)
    n = 23
    rows = Dataset.from_dict({"Label_A": (np.arange(n) % 2).tolist(), "Label_B": (np.arange(n) % 6).tolist()})
    image = rng.normal(size=(n, 5)).astype(np.float32)
    text = (
        [rng.normal(size=(int(rng.integers(1, 6)), 4)).astype(np.float32) for _ in range(n)]
        if tokens
        else rng.normal(size=(n, 4)).astype(np.float32)
    )
    order = np.arange(n) if visit == "in order" else rng.permutation(n)
    written = write_features(_batches(order, text, image, 3), rows, tmp_path / "split.arrow")
    whole = feature_table(text, image, rows)
    assert written.features == whole.features
    assert written.with_format("arrow")[:].equals(whole.with_format("arrow")[:])
    from datasets import DatasetDict

    save_dataset(DatasetDict(train=written), tmp_path / "chunked")
    save_dataset(DatasetDict(train=whole), tmp_path / "whole")
    stored = [(tmp_path / d / "train/data-00000-of-00001.arrow").read_bytes() for d in ("chunked", "whole")]
    assert stored[0] == stored[1]
    assert len(open_dataset(tmp_path / "chunked")["train"]) == n


@pytest.mark.slow
def test_frozen_model_predicts_the_same_from_images_and_from_features(frozen):
    from aigid.core.data import open_dataset
    from aigid.detector.cache import open_features, predict_from_features
    from aigid.detector.infer import RunOptions, predict_logits
    from aigid.detector.model import load_detector

    detector = load_detector(frozen / "models/retrained")
    model = detector.model
    test = open_dataset(frozen / "data/prepared")["test"]
    a1, b1 = predict_logits(detector, test, RunOptions(batch_size=8))
    a2, b2 = predict_from_features(model, open_features(frozen / "data/features")["test"])
    assert torch.allclose(torch.from_numpy(a1), torch.from_numpy(a2), atol=1e-4)
    assert torch.allclose(torch.from_numpy(b1), torch.from_numpy(b2), atol=1e-4)


@pytest.mark.slow
def test_batches_of_cached_features_are_the_rows_pseudo_labelled_ones_included(frozen):
    from aigid.core.config import load_params
    from aigid.core.data import open_dataset
    from aigid.detector.cache import FeatureCollator, FeatureRows, open_features
    from aigid.training.fit import feature_splits

    params = load_params(frozen / "params.yaml")
    train, _, _ = feature_splits(params, frozen / "data/features", frozen / "data/pseudolabel")
    pseudo = open_dataset(frozen / "data/pseudolabel")["train"]
    pool = open_features(frozen / "data/features")[params.pseudolabel.pool]
    assert len(pseudo) > 0
    rows = FeatureRows(train)
    indices = [len(train) - 1, 0, 5, len(train) - len(pseudo)]  # pseudo-labelled rows come last
    batch = FeatureCollator()(rows.__getitems__(indices))
    assert batch["text_features"].dtype == torch.float32 and batch["labels_a"].dtype == torch.int64
    listed = FeatureCollator()(train.with_format("numpy").__getitems__(indices))  # rows of a plain dataset
    assert all(torch.equal(batch[k], listed[k]) for k in batch)
    for k, i in enumerate(indices):
        row = train.with_format("numpy")[i]
        assert np.array_equal(batch["text_features"][k].numpy(), row["text_features"])
        assert np.array_equal(batch["image_features"][k].numpy(), row["image_features"])
        assert (batch["labels_a"][k], batch["labels_b"][k]) == (row["Label_A"], row["Label_B"])
    last = pseudo[len(pseudo) - 1]
    assert np.array_equal(batch["image_features"][0].numpy(), np.asarray(pool[last["pool_row"]]["image_features"]))
    assert (batch["labels_a"][0], batch["labels_b"][0]) == (last["Label_A"], last["Label_B"])
