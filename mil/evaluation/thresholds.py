"""Decision thresholds and the confusion-matrix metrics that depend on them.

A threshold is a choice, so it is made on validation predictions and then applied unchanged to test
predictions; choosing it on test would report the best case, not what a deployed model would do.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

FIXED = 0.5
THRESHOLD_METRICS = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1.

    ``score >= threshold`` predicts positive. Ties in J go to the highest threshold (fewest positives), so the
    choice is deterministic. Needs both classes; raises ValueError otherwise.
    """
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        raise ValueError("Youden's J needs both classes among the labels")
    fpr, tpr, thresholds = roc_curve(labels, np.asarray(scores, dtype=float), drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn prepends +inf (nothing predicted positive)
    j = (tpr - fpr)[finite]
    return float(thresholds[finite][int(np.argmax(j))])


def confusion(labels: np.ndarray, predicted: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) for binary 0/1 arrays."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    tp = int(np.sum(labels & predicted))
    fp = int(np.sum(~labels & predicted))
    tn = int(np.sum(~labels & ~predicted))
    fn = int(np.sum(labels & ~predicted))
    return tp, fp, tn, fn


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def metrics_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, F1, sensitivity and specificity of ``score >= threshold``.

    Written on the confusion matrix (not sklearn's scorers) because the bootstrap calls it thousands of times;
    the tests check it against sklearn. Undefined ratios are NaN, except F1 which is 0 when nothing is predicted
    positive and there are positives (sklearn's convention).
    """
    tp, fp, tn, fn = confusion(labels, np.asarray(scores) >= threshold)
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "balanced_accuracy": float(np.nanmean([sensitivity, specificity]))
        if not (np.isnan(sensitivity) and np.isnan(specificity)) else float("nan"),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0,
        "sensitivity": sensitivity,
        "specificity": specificity,
    }
