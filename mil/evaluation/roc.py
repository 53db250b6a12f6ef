"""ROC curve figure for a run: each split's curve with its AUC and bootstrap 95% CI in the legend, and the
validation-chosen operating points, so the PNG reads on its own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from features.store import atomic_path  # noqa: E402
from mil.evaluation.bootstrap import DEFAULT_N, bootstrap  # noqa: E402
from mil.evaluation.thresholds import metrics_at_threshold  # noqa: E402


def auc_label(name: str, truth: np.ndarray, score: np.ndarray, n_resamples: int, seed: int) -> str:
    """``test: AUC 0.912 [0.851, 0.962], n=129`` (stratified bootstrap over slides, 95% percentile interval)."""
    auc = bootstrap(lambda y, s: {"auc": roc_auc_score(y, s) if len(np.unique(y)) == 2 else float("nan")},
                    truth, score, n_resamples=n_resamples, seed=seed)["auc"]
    ci = f" [{auc.low:.3f}, {auc.high:.3f}]" if np.isfinite(auc.low) else ""
    return f"{name}: AUC {auc.value:.3f}{ci}, n={len(truth)}"


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], thresholds: Mapping[str, float] | None = None,
               title: str = "ROC", n_resamples: int = DEFAULT_N, seed: int = 0) -> Figure:
    """One ROC curve per named (labels, scores) pair, labelled with its AUC and 95% CI; each threshold is marked
    on the first curve.

    ``curves`` values are (labels, scores) for binary tasks, or (labels, probabilities) for multi-class, which
    draws one one-vs-rest curve per class.
    """
    figure = Figure(figsize=(5, 5), dpi=120, layout="constrained")
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance (AUC 0.5)")
    first = True
    for name, (labels, scores) in curves.items():
        labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
        pairs = ([(name, labels, scores)] if scores.ndim == 1 else
                 [(f"{name} class {c}", (labels == c).astype(int), scores[:, c]) for c in range(scores.shape[1])])
        for label, truth, score in pairs:
            if len(np.unique(truth)) < 2:
                continue
            fpr, tpr, _ = roc_curve(truth, score)
            axis.plot(fpr, tpr, linewidth=1.5, label=auc_label(label, truth, score, n_resamples, seed))
        if first and scores.ndim == 1 and thresholds and len(np.unique(labels)) == 2:
            for tname, threshold in thresholds.items():
                m = metrics_at_threshold(labels, scores, threshold)
                axis.plot(1 - m["specificity"], m["sensitivity"], marker="o", linestyle="none",
                          label=f"{tname} = {threshold:.3g} (chosen on val)")
        first = False
    axis.set(xlabel="false-positive rate (1 - specificity)", ylabel="true-positive rate (sensitivity)",
             xlim=(0, 1), ylim=(0, 1.01), title=title)
    axis.legend(loc="lower right", fontsize=7, title="95% CI: stratified bootstrap", title_fontsize=7)
    return figure


def plot_roc(path: str | Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
             thresholds: Mapping[str, float] | None = None, title: str = "ROC", n_resamples: int = DEFAULT_N,
             seed: int = 0) -> Path:
    """Write :func:`roc_figure` as a PNG."""
    figure = roc_figure(curves, thresholds, title, n_resamples, seed)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
