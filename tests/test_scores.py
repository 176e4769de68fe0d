"""The rows a scored image gets (aigid.detector.scores): the decision rule in numpy is the torch one."""

import os

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


def test_the_decision_is_the_same_on_numpys_avx2_and_avx512_paths():
    """numpy picks its vector code by CPU; the rule's probabilities (hence labels and metrics) must not follow."""
    import subprocess
    import sys

    code = (
        "import numpy as np, sys; from aigid.detector.scores import decide; rng = np.random.default_rng(0); "
        "d = decide(rng.normal(0, 4, 5000).astype(np.float32), rng.normal(0, 4, (5000, 6)).astype(np.float32)); "
        "sys.stdout.write(b''.join(np.ascontiguousarray(v).tobytes() for v in d).hex())"
    )
    outputs = {
        pinned: subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "NPY_DISABLE_CPU_FEATURES": pinned},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for pinned in ("", "X86_V4 AVX512_ICL AVX512_SPR")  # the machine's widest; AVX2 at most
    }
    assert len(set(outputs.values())) == 1 and len(outputs[""]) > 0
