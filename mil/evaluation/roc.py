"""ROC curve figure for a run: the evaluated split's curve, with the validation-chosen operating points."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from features.store import atomic_path  # noqa: E402
from mil.evaluation.thresholds import metrics_at_threshold  # noqa: E402


def plot_roc(path: str | Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
             thresholds: Mapping[str, float] | None = None, title: str = "ROC") -> Path:
    """Write a PNG with one ROC curve per named (labels, scores) pair; marks each threshold on the first curve.

    ``curves`` values are (labels, scores) for binary tasks, or (labels, probabilities) for multi-class, which
    draws one one-vs-rest curve per class.
    """
    figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    axis.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    first = True
    for name, (labels, scores) in curves.items():
        labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
        pairs = ([(name, labels, scores)] if scores.ndim == 1 else
                 [(f"{name} class {c}", (labels == c).astype(int), scores[:, c]) for c in range(scores.shape[1])])
        for label, truth, score in pairs:
            if len(np.unique(truth)) < 2:
                continue
            fpr, tpr, _ = roc_curve(truth, score)
            axis.plot(fpr, tpr, linewidth=1.5, label=label)
        if first and scores.ndim == 1 and thresholds and len(np.unique(labels)) == 2:
            for tname, threshold in thresholds.items():
                m = metrics_at_threshold(labels, scores, threshold)
                axis.plot(1 - m["specificity"], m["sensitivity"], marker="o", linestyle="none",
                          label=f"{tname} = {threshold:.3g}")
        first = False
    axis.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
