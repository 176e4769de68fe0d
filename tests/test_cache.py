"""The feature cache of frozen-encoder mode (aigid.detector.cache), on the tiny pipeline run frozen (the
``frozen`` fixture, conftest.py): batches of cached rows, and scores from features equal to scores from images."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


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


def test_batches_of_cached_features_are_the_rows_pseudo_labelled_ones_included(frozen):
    from aigid.core.config import load_params
    from aigid.core.data import open_dataset
    from aigid.detector.cache import FeatureCollator, FeatureRows, open_features
    from aigid.stages.train import _feature_splits

    params = load_params(frozen / "params.yaml")
    train, _ = _feature_splits(params, frozen / "data/features", frozen / "data/pseudolabel")
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
