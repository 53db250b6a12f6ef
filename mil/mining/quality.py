"""How good a selection is, measured against annotations: is mining finding what it claims to find?

Two questions. Are pseudo-positives really tumor (precision against tumor polygons)? Are hard negatives
enriched for tumor look-alikes, compared with negatives drawn at random from the same normal slides? The
random baseline is exact: drawing uniformly from the normal-slide pool hits each category with its share of
the pool, so no sampling noise enters the enrichment factor. A hard negative on a tumor polygon inside a
normal slide would mean the labels or annotations disagree, so it is reported as an error count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.store import atomic_path

CATEGORIES = ("tumor", "lookalike", "normal")
UNKNOWN = "unknown"


def composition(truth: pd.Series) -> dict[str, float]:
    """Share of each truth category among patches with known truth (NaN shares for an empty set)."""
    truth = truth[truth != UNKNOWN]
    n = len(truth)
    return {c: (float((truth == c).sum()) / n if n else math.nan) for c in CATEGORIES}


def selection_quality(table: pd.DataFrame, selection: pd.DataFrame) -> dict[str, Any]:
    """Quality numbers from the training patch table and the selection, both carrying a ``truth`` column."""
    if "truth" not in table.columns or "truth" not in selection.columns:
        raise ValueError("selection quality needs a 'truth' column (tumor|lookalike|normal) from annotations")
    positives = selection[selection["kind"] == "positive"]
    hard = selection[selection["kind"] == "hard_negative"]
    plain = selection[selection["kind"] == "negative"]
    pool = table[table["label"] == 0]
    tumor_slides = table[table["label"] == 1]
    hard_mix, pool_mix = composition(hard["truth"]), composition(pool["truth"])
    report: dict[str, Any] = {
        "counts": {"positive": len(positives), "hard_negative": len(hard), "negative": len(plain),
                   "normal_pool": len(pool), "tumor_slide_patches": len(tumor_slides)},
        "positive_precision": composition(positives["truth"])["tumor"],
        "tumor_share_in_tumor_slides": composition(tumor_slides["truth"])["tumor"],
        "hard_negative_composition": hard_mix,
        "random_negative_composition": pool_mix,
        "hard_negative_on_tumor_errors": int((hard["truth"] == "tumor").sum()),
        "lookalike_enrichment": _ratio(hard_mix["lookalike"], pool_mix["lookalike"]),
    }
    if len(plain):
        report["plain_negative_composition"] = composition(plain["truth"])
    return report


def candidate_pool(slide_labels: np.ndarray, probs: np.ndarray, threshold: float,
                   max_share: float) -> dict[str, Any]:
    """Label-free check of the positive candidate pool: is it implausibly large?

    Candidates are tumor-slide patches at or above the pseudo-label ``threshold``. Tumor is usually a small
    part of a tumor slide, so when candidates are more than ``max_share`` of its patches, most of them are
    probably not tumor (look-alikes commoner on tumor slides, plain tissue of a confidently called slide).
    The share of normal-slide patches above the same threshold says how unselective the threshold is.
    """
    labels, probs = np.asarray(slide_labels), np.asarray(probs, dtype=np.float64)
    tumor, normal = probs[labels == 1], probs[labels == 0]
    n = int((tumor >= threshold).sum())
    share = n / len(tumor) if len(tumor) else math.nan
    report: dict[str, Any] = {
        "threshold": float(threshold), "candidates": n, "tumor_slide_patches": int(len(tumor)),
        "candidate_share": share, "max_share": float(max_share),
        "normal_share_above_threshold": float((normal >= threshold).mean()) if len(normal) else math.nan,
        "warning": None,
    }
    if share > max_share:
        report["warning"] = (f"positive candidates are {share:.0%} of tumor-slide patches ({n} of {len(tumor)} at "
                             f"probability >= {threshold:.2f}; {report['normal_share_above_threshold']:.1%} of "
                             "normal-slide patches pass too): more than tumor usually covers, so most are probably "
                             "look-alikes or normal tissue; keep the twin test on (mining.twins.k > 0) or set "
                             "mining.normal_quantile (e.g. 0.999)")
    return report


def _ratio(numerator: float, denominator: float) -> float:
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


def write_quality(path: str | Path, report: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(report), indent=2, sort_keys=True) + "\n")
    return Path(path)


def _finite(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


def truth_categories(table: pd.DataFrame, annotations: str | Path, patch_size_level0: dict[str, int],
                     min_overlap: float = 0.5) -> pd.Series:
    """Per-patch truth (tumor|lookalike|normal) from each slide's annotation file.

    A normal slide without a file is all normal; a tumor slide without one is ``unknown`` (we cannot tell
    which of its patches are tumor) and is left out of every share.
    """
    from features.annotations import find_annotation, patch_categories, read_polygons

    truth = pd.Series(UNKNOWN, index=table.index, dtype=object)
    for slide_id, rows in table.groupby("slide_id").groups.items():
        path = find_annotation(annotations, str(slide_id))
        if path is None:
            if (table.loc[rows, "label"] == 0).all():
                truth.loc[rows] = "normal"
            continue
        coords = table.loc[rows, ["x", "y"]].to_numpy(dtype=np.int64)
        truth.loc[rows] = patch_categories(read_polygons(path), coords, patch_size_level0[str(slide_id)], min_overlap)
    return truth
