"""The rows a scored image gets (aigid.detector.scores): the decision rule in numpy is the torch one."""

import numpy as np
import torch

from aigid.detector.scores import decide


def test_the_decision_rule_is_torchs_sigmoid_and_softmax_over_the_ai_classes_without_overflow():
    rng = np.random.default_rng(1)
    logits_a = np.concatenate([rng.normal(0, 3, 200), [0.0, 100.0, -100.0, 1e4, -1e4]]).astype(np.float32)
    logits_b = rng.normal(0, 3, (len(logits_a), 6)).astype(np.float32)
    logits_b[0, 0] = 50.0  # a real-class logit never wins Task B
    prob = torch.sigmoid(torch.from_numpy(logits_a))
    masked = torch.from_numpy(logits_b).clone()
    masked[:, 0] = float("-inf")
    softmax = masked.softmax(dim=-1)
    for threshold in (0.5, 0.9):
        d = decide(logits_a, logits_b, threshold)
        assert np.isfinite(d.prob_ai).all() and np.isfinite(d.probs_b).all()
        assert np.allclose(d.prob_ai, prob.numpy(), rtol=0, atol=1e-6)
        assert np.array_equal(d.label_a, (prob >= threshold).long().numpy())
        assert np.allclose(d.probs_b, softmax.numpy(), rtol=0, atol=1e-6)
        assert np.array_equal(d.label_b, np.where(d.label_a == 1, softmax.argmax(-1).numpy(), 0))
        assert np.allclose(d.conf_a, torch.maximum(prob, 1 - prob).numpy(), rtol=0, atol=1e-6)
        assert np.array_equal(d.conf_b, np.where(d.label_a == 1, d.probs_b.max(-1), d.conf_a))
