"""The pipeline with real pretrained encoders on real images (benchmarks/real.py, reduced): the encoders built by
``../shared/real/build_encoders.py`` (cached), frozen; ml72 for train and validation, held-out ml72 and spai
images as test. Runs with ``AIGID_REAL_TEST=1``; skipped where the real image set is absent (``../shared/real``
beside the repository, or ``$AIGID_REAL_DATA``)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("real", REPO / "benchmarks" / "real.py")
real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)

REASON = real.missing(real.real_dir())
# CLIP ViT-B/16 through all eight stages takes longer than the whole suite's budget on 2 cores (export traces
# and checks a 436 MB graph): the check runs where it is asked for, with AIGID_REAL_TEST=1.
ASKED = os.environ.get("AIGID_REAL_TEST") == "1"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(REASON), reason=f"no real image set: {REASON}"),
    pytest.mark.skipif(not ASKED, reason="the real-data check runs with AIGID_REAL_TEST=1 (about 15 min or more)"),
]


def test_real_encoders_separate_real_from_ai_within_the_source(tmp_path):
    # 10 train, 5 validation, 3 pool, 7 test images per class of ml72; 3 spai images per class; one robustness point
    report = real.run(tmp_path, per_class=(10, 5, 3, 7), grid={"jpeg": [75]}, across_per_class=3, bootstrap=200)

    within = report["sources"]["ml72"]
    assert (within["real"], within["ai"]) == (7, 7)
    for model in ("base", "retrained"):  # frozen CLIP features and 20 labelled images: well above chance
        auc = within[model]["roc_auc"]
        assert auc["value"] >= 0.75 and auc["ci95"][0] > 0.5, (model, auc)
    # pipeline and probe scored the same images: the test folders' files, per source
    for source, r in report["sources"].items():
        on_disk = sorted(p.name for p in (tmp_path / real.RAW / "test").rglob(f"{source}__*"))
        assert sorted(r["files"]) == on_disk
        assert {"probe", "base", "retrained", "base_minus_probe_auc"} <= set(r)
    # aigid detect reproduces evaluate's Task A ROC AUC on the whole test split
    for model in ("base", "retrained"):
        assert report["all_test"][model] == pytest.approx(report["evaluate_roc_auc"][model], abs=0.01)
