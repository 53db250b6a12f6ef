"""Bootstrap 95% confidence intervals over slides.

Slides are resampled with replacement *within each class* (stratified), so every resample keeps the class
counts of the evaluated set: AUC stays defined in every resample and the interval reflects the uncertainty of
this cohort's size, not of its class balance. Percentile intervals; seeded, so reruns give the same numbers.

A class of one slide cannot be resampled: every resample holds that same slide, so an interval would show only
the other class's spread (with one slide per class, none: a test AUC of 0.000 [0.000, 0.000] from two slides).
Intervals are then undefined (NaN) rather than falsely narrow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

DEFAULT_N = 1000
DEFAULT_LEVEL = 0.95
MIN_PER_CLASS = 2
"""Fewest slides a class needs for a stratified bootstrap to say anything about its variation."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float | None]:
        return {"value": _json_float(self.value), "ci_low": _json_float(self.low), "ci_high": _json_float(self.high)}


def _json_float(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def stratified_indices(labels: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, len(labels)) row indices; each row resamples every class with replacement to its own size."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = np.empty((n_resamples, len(labels)), dtype=np.int64)
    start = 0
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        out[:, start:start + len(members)] = rng.choice(members, size=(n_resamples, len(members)), replace=True)
        start += len(members)
    return out


def smallest_class(labels: np.ndarray) -> int:
    """Slides in the rarest class present (0 for no slides)."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return int(counts.min()) if len(counts) else 0


def bootstrap(
    statistic: Callable[[np.ndarray, np.ndarray], Mapping[str, float]],
    labels: np.ndarray,
    scores: np.ndarray,
    n_resamples: int = DEFAULT_N,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Interval]:
    """Point estimates of every metric ``statistic`` returns, each with a stratified percentile interval.

    ``scores`` may be (N,) or (N, C); rows are resampled together with ``labels``. A metric that is undefined
    in some resamples (NaN) gets its interval from the resamples where it is defined. With a class of fewer than
    :data:`MIN_PER_CLASS` slides, every interval is NaN (the point estimates stay).
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    point = dict(statistic(labels, scores))
    if n_resamples <= 0 or len(labels) == 0 or smallest_class(labels) < MIN_PER_CLASS:
        return {name: Interval(value, float("nan"), float("nan")) for name, value in point.items()}
    draws = {name: np.empty(n_resamples) for name in point}
    for row, index in enumerate(stratified_indices(labels, n_resamples, seed)):
        values = statistic(labels[index], scores[index])
        for name in point:
            draws[name][row] = values.get(name, float("nan"))
    alpha = (1.0 - level) / 2.0
    result = {}
    for name, value in point.items():
        finite = draws[name][np.isfinite(draws[name])]
        low, high = (np.quantile(finite, [alpha, 1.0 - alpha]) if len(finite) else (float("nan"),) * 2)
        result[name] = Interval(float(value), float(low), float(high))
    return result
