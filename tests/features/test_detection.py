"""MIDOG-style detection scoring against hand-computed examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.errors import InputError
from features.heads.detection import Counts, best_threshold, detection_counts, match_image, nms, radius_px


def frame(rows, columns=("image", "x", "y", "score")):
    return pd.DataFrame(rows, columns=list(columns))


def test_hand_computed_f1_with_per_image_radius():
    # Image a: 0.25 µm/px -> 7.5 µm = 30 px. Image b: 0.5 µm/px -> 15 px.
    truth = frame([("a", 100, 100), ("a", 200, 100), ("b", 50, 50)], ("image", "x", "y"))
    detections = frame([
        ("a", 110, 100, 0.9),   # TP: 10 px from (100, 100)
        ("a", 105, 100, 0.8),   # FP: (100, 100) already claimed, (200, 100) 95 px away
        ("a", 190, 100, 0.7),   # TP: 10 px from (200, 100)
        ("a", 500, 500, 0.6),   # FP
        ("b", 70, 50, 0.9),     # FP: 20 px > 15 px at 0.5 µm/px (it would count at 0.25 µm/px)
    ])
    counts = detection_counts(detections, truth, {"a": 0.25, "b": 0.5}, threshold=0.0)
    assert counts == Counts(tp=2, fp=3, fn=1)
    assert counts.f1 == pytest.approx(2 * 2 / (2 * 2 + 3 + 1))
    assert counts.precision == pytest.approx(2 / 5) and counts.recall == pytest.approx(2 / 3)
    # The same detection in image b counts once b is scanned at 0.25 µm/px.
    assert detection_counts(detections, truth, {"a": 0.25, "b": 0.25}, threshold=0.0) == Counts(3, 2, 0)


def test_matching_is_greedy_in_score_order():
    truth = np.array([[0.0, 0.0], [40.0, 0.0]])
    detections = np.array([[21.0, 0.0], [55.0, 0.0]])
    # The higher-scored detection takes its nearest point (40, 0); the other finds only a claimed point.
    assert match_image(detections, np.array([0.9, 0.8]), truth, radius=30) == Counts(1, 1, 1)
    # Visiting the other one first lets both match: the result depends on the order, as in the challenge.
    assert match_image(detections, np.array([0.8, 0.9]), truth, radius=30) == Counts(2, 0, 0)


def test_empty_images_count_misses_and_false_alarms():
    assert match_image(np.zeros((0, 2)), np.zeros(0), np.array([[1.0, 1.0]]), 30) == Counts(0, 0, 1)
    assert match_image(np.array([[1.0, 1.0]]), np.array([0.5]), np.zeros((0, 2)), 30) == Counts(0, 1, 0)
    assert Counts(0, 0, 0).f1 == 0.0
    # An image listed with no detections and no truth adds nothing.
    truth = frame([("a", 0, 0)], ("image", "x", "y"))
    assert detection_counts(frame([]), truth, {"a": 0.25, "c": 0.25}) == Counts(0, 0, 1)


def test_nms_keeps_the_best_of_each_cluster():
    points = np.array([[0, 0], [5, 0], [100, 0], [104, 3]])
    kept = nms(points, np.array([0.8, 0.9, 0.3, 0.7]), radius=10)
    assert sorted(kept.tolist()) == [1, 3]


def test_threshold_and_nms_in_micrometres():
    truth = frame([("a", 100, 100)], ("image", "x", "y"))
    detections = frame([("a", 100, 100, 0.9), ("a", 108, 100, 0.85), ("a", 400, 400, 0.4)])
    mpp = {"a": 0.25}
    # Without NMS the duplicate is a false positive; NMS at 4 µm (16 px) removes it.
    assert detection_counts(detections, truth, mpp, threshold=0.5) == Counts(1, 1, 0)
    assert detection_counts(detections, truth, mpp, threshold=0.5, nms_radius_um=4.0) == Counts(1, 0, 0)
    threshold, counts = best_threshold(detections, truth, mpp, nms_radius_um=4.0)
    assert counts == Counts(1, 0, 0) and 0.4 < threshold <= 0.9


def test_missing_mpp_is_an_input_error():
    with pytest.raises(InputError, match="mpp"):
        radius_px(7.5, 0.0)
