"""Per-patch pseudo-labels from a slide model's patch scores, and the self-paced positive fraction.

The slide model writes raw tumor logits per patch. Thresholds are stated on probabilities (ItS2CLR uses 0.3
on the instance classifier's sigmoid output), so logits go through a sigmoid first: 0.3 on the probability
scale is a logit of about -0.85. Only patches of tumor slides can be pseudo-positive: a normal slide's label
already says every patch in it is normal.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import expit


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Tumor probability from raw patch logits (scipy's overflow-free logistic)."""
    return expit(np.asarray(logits, dtype=np.float64))


@dataclass
class PositiveSchedule:
    """Self-paced fraction r(round) of above-threshold tumor-slide patches taken as positives.

    Early rounds trust only the most confident patches; r grows linearly from ``start`` to ``end`` over
    ``ramp_rounds`` rounds once ``warmup_rounds`` have passed (ItS2CLR grows 0.2 -> 0.8 after a warm-up).
    """

    start: float = 0.2
    """Fraction of candidates taken as positives in the first rounds."""
    end: float = 0.8
    """Fraction reached at the end of the ramp."""
    warmup_rounds: int = 0
    """Rounds at the start fraction."""
    ramp_rounds: int = 3
    """Rounds over which the fraction grows from start to end."""

    def fraction(self, round_index: int) -> float:
        progress = (round_index - self.warmup_rounds) / max(1, self.ramp_rounds)
        return float(self.start + (self.end - self.start) * min(1.0, max(0.0, progress)))


def pseudo_positive_mask(slide_ids: np.ndarray, slide_labels: np.ndarray, probs: np.ndarray, threshold: float,
                         fraction: float, eligible: np.ndarray | None = None,
                         groups: np.ndarray | None = None) -> np.ndarray:
    """Mask of pseudo-positive patches: the top ``fraction`` (by probability) of tumor-slide patches >= threshold.

    Ranking is over the whole training cohort, so a confident slide contributes more than a doubtful one; with
    ``groups`` (e.g. each patch's site) it is within each group, at least one per group with candidates, so a
    group whose scores run higher (a site's stain) does not supply every positive. ``eligible`` (optional mask)
    excludes patches beforehand (e.g. those with a normal-slide twin). When no patch passes, the top patch of
    each tumor slide is taken instead, with a warning, so the loop never stalls on an empty positive set.
    """
    slide_ids, probs = np.asarray(slide_ids), np.asarray(probs, dtype=np.float64)
    tumor = np.asarray(slide_labels) == 1
    allowed = np.ones(len(probs), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    candidates = np.flatnonzero(tumor & (probs >= threshold) & allowed)
    mask = np.zeros(len(probs), dtype=bool)
    if len(candidates) == 0:
        if tumor.any():
            why = "" if eligible is None else " and passes the twin test"
            warnings.warn(f"no tumor-slide patch has probability >= {threshold}{why}; taking the top patch of "
                          "each tumor slide as positive", stacklevel=2)
            mask[top_per_slide(slide_ids, probs, tumor)] = True
        return mask
    group = np.zeros(len(probs), dtype=int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    for name in np.unique(group[candidates]):
        members = candidates[group[candidates] == name]
        keep = max(1, int(round(fraction * len(members))))
        order = members[np.lexsort((members, -probs[members]))]  # ties broken by position: deterministic
        mask[order[:keep]] = True
    return mask


def normal_calibrated_threshold(probs: np.ndarray, slide_labels: np.ndarray, threshold: float,
                                quantile: float | None) -> float:
    """The pseudo-label threshold, raised to the ``quantile`` of normal-slide patch probabilities.

    A normal slide holds no tumor, so its patch probabilities show how high a non-tumor patch can score,
    look-alikes included, without any annotation. Above the 0.999 quantile almost no normal-slide patch
    remains; a tumor-slide patch below it scores like something normal slides have too, however confident the
    slide model is about the slide. A fixed threshold cannot know this: once the slide model is confident,
    sigmoid(logit) >= 0.3 admits most of a tumor slide. ``quantile=None`` keeps the fixed threshold.
    """
    normal = np.asarray(probs, dtype=np.float64)[np.asarray(slide_labels) == 0]
    if quantile is None or len(normal) == 0:
        return float(threshold)
    return float(max(threshold, np.quantile(normal, quantile, method="higher")))


def top_per_slide(slide_ids: np.ndarray, scores: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Index of the highest-scoring patch of each slide among ``where``."""
    picks = []
    for slide in np.unique(slide_ids[where]):
        rows = np.flatnonzero(where & (slide_ids == slide))
        picks.append(rows[int(np.argmax(scores[rows]))])
    return np.asarray(picks, dtype=np.int64)
