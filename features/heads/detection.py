"""Point detection scored as the MIDOG challenge scores it, plus non-maximum suppression of nearby detections.

A detection is a true positive when it lies within ``radius_um`` (7.5 µm) of a ground-truth point that no
earlier detection has claimed; the radius is converted to pixels per image from that image's mpp, because
MIDOG images come from scanners with different resolutions. Matching is greedy and order-dependent, as in the
challenge code: detections are visited by descending score and each takes the nearest unclaimed point within
the radius. TP, FP and FN are summed over images before F1 is computed (a micro F1, so an image with many
figures weighs more than one with few).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from features.errors import InputError

MIDOG_RADIUS_UM = 7.5


@dataclass(frozen=True)
class Counts:
    tp: int
    fp: int
    fn: int

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        # 2TP / (2TP + FP + FN): defined (0) even when precision or recall is undefined.
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0


def radius_px(radius_um: float, mpp: float) -> float:
    if not mpp or mpp <= 0 or not np.isfinite(mpp):
        raise InputError(f"mpp {mpp!r} is not a positive number; every image needs its microns per pixel")
    return radius_um / mpp


def match_image(detections: np.ndarray, scores: np.ndarray, truth: np.ndarray, radius: float) -> Counts:
    """Greedy matching of one image's detections (N, 2) to its ground-truth points (M, 2), radius in pixels."""
    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 2)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    if len(detections) == 0 or len(truth) == 0:
        return Counts(0, len(detections), len(truth))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tree = cKDTree(truth)
    claimed = np.zeros(len(truth), dtype=bool)
    tp = 0
    for index in order:
        near = tree.query_ball_point(detections[index], r=radius)
        free = [j for j in near if not claimed[j]]
        if not free:
            continue
        distances = np.linalg.norm(truth[free] - detections[index], axis=1)
        claimed[free[int(np.argmin(distances))]] = True
        tp += 1
    return Counts(tp, len(detections) - tp, len(truth) - tp)


def nms(points: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Indices of detections kept when each suppresses lower-scored ones within ``radius`` pixels."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tree = cKDTree(points)
    suppressed = np.zeros(len(points), dtype=bool)
    kept = []
    for index in order:
        if suppressed[index]:
            continue
        kept.append(index)
        suppressed[tree.query_ball_point(points[index], r=radius)] = True
    return np.asarray(kept, dtype=np.int64)


def detection_counts(detections: pd.DataFrame, truth: pd.DataFrame, mpp: Mapping[str, float],
                     threshold: float = 0.5, radius_um: float = MIDOG_RADIUS_UM,
                     nms_radius_um: float | None = None) -> Counts:
    """Summed counts over every image in ``mpp``.

    ``detections``: columns image, x, y, score; ``truth``: image, x, y (positives only). Detections below
    ``threshold`` are dropped first, then (optionally) suppressed within ``nms_radius_um``.
    """
    total = Counts(0, 0, 0)
    kept = detections[detections["score"] >= threshold]
    det_groups = dict(tuple(kept.groupby("image", sort=False)))
    gt_groups = dict(tuple(truth.groupby("image", sort=False)))
    for image, image_mpp in mpp.items():
        det = det_groups.get(image, kept.iloc[:0])
        points, scores = det[["x", "y"]].to_numpy(float), det["score"].to_numpy(float)
        if nms_radius_um is not None and len(points):
            keep = nms(points, scores, radius_px(nms_radius_um, image_mpp))
            points, scores = points[keep], scores[keep]
        gt = gt_groups.get(image, truth.iloc[:0])[["x", "y"]].to_numpy(float)
        total = total + match_image(points, scores, gt, radius_px(radius_um, image_mpp))
    return total


def best_threshold(detections: pd.DataFrame, truth: pd.DataFrame, mpp: Mapping[str, float],
                   radius_um: float = MIDOG_RADIUS_UM, nms_radius_um: float | None = None,
                   candidates: np.ndarray | None = None) -> tuple[float, Counts]:
    """The score threshold with the highest F1 (choose it on validation images, then apply it to test ones)."""
    if candidates is None:
        candidates = np.unique(detections["score"].to_numpy(float))
        if len(candidates) > 200:  # quantiles keep the search linear in the number of detections
            candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, 201)))
    best = (0.5, Counts(0, 0, 0))
    best_f1 = -1.0
    for threshold in candidates:
        counts = detection_counts(detections, truth, mpp, float(threshold), radius_um, nms_radius_um)
        if counts.f1 > best_f1:
            best, best_f1 = (float(threshold), counts), counts.f1
    return best
