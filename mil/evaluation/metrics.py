"""Slide-level metrics for binary and multi-class predictions, as functions the bootstrap can resample."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from sklearn.metrics import roc_auc_score

from mil.evaluation.thresholds import metrics_at_threshold

Statistic = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (sklearn); NaN when only one class is present, instead of raising."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=float)))


def binary_statistic(thresholds: Mapping[str, float]) -> Statistic:
    """A statistic giving ``auc`` and ``<threshold name>/<metric>`` for each named threshold."""

    def statistic(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        values = {"auc": binary_auc(labels, scores)}
        for name, threshold in thresholds.items():
            for metric, value in metrics_at_threshold(labels, scores, threshold).items():
                values[f"{name}/{metric}"] = value
        return values

    return statistic


def multiclass_statistic(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Macro one-vs-rest AUC, accuracy, balanced accuracy and macro F1 of argmax predictions.

    ``labels`` are class indices into the columns of ``probabilities`` (N, C). Per-class terms for a class
    absent from ``labels`` are left out of the macro means (its recall and AUC are undefined).
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = probabilities.argmax(axis=1)
    present = np.unique(labels)
    recalls, f1s, aucs = [], [], []
    for cls in range(probabilities.shape[1]):
        truth, guess = labels == cls, predicted == cls
        tp = np.sum(truth & guess)
        denominator = truth.sum() + guess.sum()
        if cls in present:
            recalls.append(tp / truth.sum())
            if len(present) > 1:
                aucs.append(roc_auc_score(truth, probabilities[:, cls]))
        if cls in present or guess.any():
            f1s.append(2 * tp / denominator if denominator else 0.0)
    return {
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else float("nan"),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "f1": float(np.mean(f1s)) if f1s else float("nan"),
    }
