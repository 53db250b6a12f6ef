"""ROC figures read on their own: each curve's legend entry carries its AUC and bootstrap 95% CI."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mil.evaluation.roc import plot_roc, roc_figure


def test_roc_legend_has_auc_and_ci_per_curve(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30), np.ones(20)].astype(int)
    scores = labels + rng.normal(0, 0.8, len(labels))
    figure = roc_figure({"test": (labels, scores), "val": (labels[::2], scores[::2])}, {"youden": 0.5},
                        title="ROC (test, n=50)", n_resamples=200)
    texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    entry = next(t for t in texts if t.startswith("test:"))
    match = re.fullmatch(r"test: AUC (\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\], n=50", entry)
    assert match, entry
    auc, low, high = map(float, match.groups())
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=5e-4) and low < auc < high
    assert any(t.startswith("val: AUC") for t in texts) and "youden = 0.5 (chosen on val)" in texts
    assert figure.axes[0].get_xlabel().startswith("false-positive rate")
    assert plot_roc(tmp_path / "roc.png", {"test": (labels, scores)}, n_resamples=50).is_file()
