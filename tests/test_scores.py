"""The rows a scored image gets (aigid.detector.scores): the decision rule in numpy is the torch one; a model's own
rule (calibration, the verdict's thresholds) is fitted to meet its targets and travels in scoring.json."""

import json
import os

import numpy as np
import pytest
import torch

from aigid.detector.scores import (
    DEMO_NOTICE,
    SCORING_FILE,
    Scoring,
    decide,
    fit_scoring,
    fit_temperature,
    lower_at_fnr,
    score_rows,
    threshold_at_fpr,
)


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


def test_threshold_at_fpr_is_the_lowest_with_at_most_the_target_rate():
    rng = np.random.default_rng(0)
    real = rng.random(200).astype(np.float32)
    t = threshold_at_fpr(real, 0.05)
    assert (real >= t).mean() <= 0.05  # at most 10 of 200 false positives
    assert (real >= np.sort(real)[::-1][10]).mean() > 0.05  # any lower score as threshold would exceed it
    assert (real >= t).sum() == 10


def test_threshold_at_fpr_with_ties_never_exceeds_the_target():
    real = np.array([0.9] * 5 + [0.1] * 15, dtype=np.float32)  # 5 of 20 tied at the top: 25%
    t = threshold_at_fpr(real, 0.1)
    assert (real >= t).mean() == 0.0 and t > 0.9
    # Compared in float32, as the model's probabilities are, the step above 0.9 survives.
    assert not (torch.tensor(real) >= t).any()


def test_lower_at_fnr_is_the_highest_with_at_most_the_target_rate():
    rng = np.random.default_rng(0)
    ai = rng.random(200).astype(np.float32)
    lower = lower_at_fnr(ai, 0.05)
    assert (ai < lower).sum() == 10  # at most 10 of 200 called real, and no higher cut keeps that
    assert (ai < np.nextafter(lower, np.float32(2))).sum() > 10
    tied = np.array([0.2] * 5 + [0.9] * 15, dtype=np.float32)
    assert (tied < lower_at_fnr(tied, 0.1)).sum() == 0


def _validation(rng, n=4000):
    """Labels and their true log-odds: x ~ N(+-0.5, 1) by class, so log p(x|AI) / p(x|real) = x."""
    labels = rng.integers(0, 2, n)
    return rng.normal(np.where(labels == 1, 0.5, -0.5), 1.0), labels


def test_temperature_scaling_recovers_the_overconfidence_factor():
    rng = np.random.default_rng(0)
    logits, labels = _validation(rng, 20000)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.05)  # calibrated already
    assert fit_temperature(logits * 3.0, labels) == pytest.approx(3.0, rel=0.05)  # three times too confident
    assert fit_temperature(logits / 2.0, labels) == pytest.approx(0.5, rel=0.05)  # too timid


def test_the_fitted_rule_meets_its_targets_on_the_rows_it_was_fitted_on():
    rng = np.random.default_rng(1)
    logits, labels = _validation(rng)
    fitted = fit_scoring(logits, labels, 0.05, 0.1, {"source": "demo", "synthetic": True})
    v = fitted["verdict"]
    assert v["lower"] <= v["threshold"]
    rule = Scoring(fitted["calibration"]["temperature"], v["threshold"], v["lower"], "demo", True)
    verdict = rule.decide(logits, np.zeros((len(labels), 6))).verdict
    assert (verdict[labels == 0] == "ai").mean() <= 0.05 == v["target_fpr"]
    assert (verdict[labels == 1] == "real").mean() <= 0.1
    assert 0 < (verdict == "unsure").mean() < 1  # a real band
    assert v["validation_fpr"] == (verdict[labels == 0] == "ai").mean()
    assert v["validation_coverage"] == (verdict != "unsure").mean()


def test_where_the_targets_cross_the_threshold_decides_alone():
    logits = np.array([-9.0, -8.0, -7.0, 7.0, 8.0, 9.0] * 20)  # perfectly separated
    labels = np.array([0, 0, 0, 1, 1, 1] * 20)
    v = fit_scoring(logits, labels, 0.05, 0.05, {"source": "x"})["verdict"]
    assert v["lower"] == v["threshold"] and v["validation_coverage"] == 1.0


def test_calibration_leaves_the_labels_at_one_half_and_the_ranking_unchanged():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 4, 500)
    raw, calibrated = decide(logits, np.zeros((500, 3))), decide(logits, np.zeros((500, 3)), temperature=2.7)
    assert np.array_equal(raw.label_a, calibrated.label_a)
    assert np.array_equal(np.argsort(raw.prob_ai, kind="stable"), np.argsort(calibrated.prob_ai, kind="stable"))
    assert not np.allclose(raw.prob_ai, calibrated.prob_ai)


def test_rows_carry_the_verdict_and_a_threshold_is_one_cut(tmp_path):
    (tmp_path / SCORING_FILE).write_text(
        json.dumps(
            {
                "calibration": {"temperature": 2.0},
                "verdict": {"threshold": 0.8, "lower": 0.3},
                "trained_on": {"source": "demo", "synthetic": True},
            }
        )
    )
    rule = Scoring.load(tmp_path)
    logits_a = np.array([-4.0, 0.0, 4.0])  # P(AI) 0.119, 0.5, 0.881 at T = 2
    rows = score_rows(logits_a, np.zeros((3, 3)), ["real", "a", "b"], ["", "", ""], rule)
    assert [r["verdict"] for r in rows] == ["real", "unsure", "ai"]
    assert [r["label"] for r in rows] == ["real", "real", "ai"] and rows[0]["threshold"] == 0.8
    assert rows[2]["prob_ai"] == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-7)
    one_cut = score_rows(logits_a, np.zeros((3, 3)), ["real", "a", "b"], ["", "", ""], rule, threshold=0.5)
    assert [r["verdict"] for r in one_cut] == ["real", "ai", "ai"] and one_cut[0]["threshold"] == 0.5
    assert rule.notices("m") == [DEMO_NOTICE]


def test_a_model_without_a_rule_is_scored_raw_at_one_half_and_says_so(tmp_path):
    rule = Scoring.load(tmp_path)
    assert (rule.temperature, rule.threshold, rule.lower, rule.fitted) == (1.0, 0.5, 0.5, False)
    assert "uncalibrated" in rule.notices(str(tmp_path))[0]
    (tmp_path / SCORING_FILE).write_text("{}")
    with pytest.raises(Exception, match="not a scoring file"):
        Scoring.load(tmp_path)
