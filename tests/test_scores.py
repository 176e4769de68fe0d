"""The rows a scored image gets (aigid.detector.scores): the decision rule in numpy is the torch one."""

import numpy as np
import torch

from aigid.detector.model import decide as torch_decide
from aigid.detector.scores import decide


def test_the_decision_rule_is_the_torch_one():
    rng = np.random.default_rng(1)
    logits_a = np.concatenate([rng.normal(0, 3, 200), [0.0, 100.0, -100.0, 1e4, -1e4]]).astype(np.float32)
    logits_b = rng.normal(0, 3, (len(logits_a), 6)).astype(np.float32)
    logits_b[0, 0] = 50.0  # a real-class logit never wins Task B
    for threshold in (0.5, 0.9):
        prob_ai, label_a, probs_b, label_b = decide(logits_a, logits_b, threshold)
        expected = torch_decide(torch.from_numpy(logits_a), torch.from_numpy(logits_b), threshold)
        assert np.allclose(prob_ai, expected.prob_ai.numpy(), rtol=0, atol=1e-6)
        assert np.array_equal(label_a, expected.label_a.numpy().astype(bool))
        assert np.allclose(probs_b, expected.probs_b.numpy(), rtol=0, atol=1e-6)
        assert np.array_equal(label_b, expected.label_b.numpy())
