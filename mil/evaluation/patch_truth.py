"""Patch-level truth from annotations, and how well a model's patch scores find it.

Each patch of a slide with ``patch_scores`` is labelled by how much of its square lies inside the annotated
polygons (level-0 pixels): tumor when at least ``min_overlap`` of it lies in tumor minus exclusion regions,
else look-alike when that much lies in look-alike regions, else normal; ``features.annotations`` defines these
categories once, so mining and evaluation agree on them. A slide whose label
is negative and that has no annotation file is all normal; a positive slide without annotations has no
patch truth and is skipped (we cannot tell which of its patches are tumor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from features.errors import InputError
from features.provenance import refuse_other_features
from features.store import find_feature_files, folder_settings
from mil.evaluation.metrics import binary_auc
from mil.patch_scores import find_patch_scores, read_patch_scores, scored_feature_settings

TILING = ("mpp", "patch_size", "overlap")  # the settings that place patches; the encoder does not

# What users call a patch score -> the dataset holding it in patch_scores files.


@dataclass
class SlidePatchTruth:
    """One slide's patch scores beside their labels."""

    slide_id: str
    scores: np.ndarray
    tumor: np.ndarray
    lookalike: np.ndarray
    annotated: bool

    @property
    def n_tumor(self) -> int:
        return int(self.tumor.sum())


def patch_size_level0(features_file: str | Path, override: int | None = None) -> int:
    """The patch side in level-0 pixels: from the file's geometry (ours, CLAM's or TRIDENT's), else ``override``."""
    from features.layouts import level0_patch_size

    return level0_patch_size(features_file, override)


def slide_truth(slide_id: str, coords: np.ndarray, scores: np.ndarray, size_level0: int,
                annotation: Path | None, slide_label: int | None, min_overlap: float) -> SlidePatchTruth | None:
    """Label one slide's patches; None when the slide has no usable truth."""
    from features.annotations import LOOKALIKE, TUMOR, patch_categories, read_polygons

    if annotation is None:
        if slide_label != 0:
            return None
        none = np.zeros(len(scores), dtype=bool)
        return SlidePatchTruth(slide_id, scores, none, none.copy(), annotated=False)
    categories = patch_categories(read_polygons(annotation), coords, size_level0, min_overlap)
    return SlidePatchTruth(slide_id, scores, categories == TUMOR, categories == LOOKALIKE, annotated=True)


def top_k_hits(truth: SlidePatchTruth, k: int) -> tuple[float, float]:
    """(recall, precision) of the ``k`` highest-scored patches against the tumor patches of one slide."""
    k = min(k, len(truth.scores))
    top = np.argsort(-truth.scores, kind="stable")[:k]
    hits = int(truth.tumor[top].sum())
    return hits / max(truth.n_tumor, 1), hits / max(k, 1)


def patch_metrics(truths: list[SlidePatchTruth], top_k: int = 10) -> dict[str, Any]:
    """Pooled and per-slide patch AUCs, top-k recall/precision, and tumor-vs-look-alike AUC."""
    if not truths:
        return {"n_slides": 0, "note": "no slide had patch truth"}
    scores = np.concatenate([t.scores for t in truths])
    tumor = np.concatenate([t.tumor for t in truths])
    lookalike = np.concatenate([t.lookalike for t in truths])
    per_slide = []
    for t in truths:
        row: dict[str, Any] = {"slide_id": t.slide_id, "n_patches": len(t.scores), "n_tumor": t.n_tumor,
                               "n_lookalike": int(t.lookalike.sum()), "auc": _none(binary_auc(t.tumor, t.scores))}
        if t.n_tumor:
            row["recall_at_k"], row["precision_at_k"] = top_k_hits(t, top_k)
        per_slide.append(row)
    tumor_slides = [r for r in per_slide if r["n_tumor"]]
    slide_aucs = [r["auc"] for r in tumor_slides if r["auc"] is not None]
    pair = tumor | lookalike
    return {
        "n_slides": len(truths),
        "n_tumor_slides": len(tumor_slides),
        "n_patches": int(len(scores)),
        "n_tumor_patches": int(tumor.sum()),
        "n_lookalike_patches": int(lookalike.sum()),
        "pooled_auc": _none(binary_auc(tumor, scores)),
        "mean_slide_auc": _none(float(np.mean(slide_aucs))) if slide_aucs else None,
        "top_k": top_k,
        "mean_recall_at_k": _mean(r["recall_at_k"] for r in tumor_slides),
        "mean_precision_at_k": _mean(r["precision_at_k"] for r in tumor_slides),
        "tumor_vs_lookalike_auc": _none(binary_auc(tumor[pair], scores[pair])) if lookalike.any() else None,
        "per_slide": per_slide,
    }


def _none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def check_same_tiling(score_files: dict[str, Path], features_folder: str | Path) -> None:
    """Refuse a ``--features`` folder tiled otherwise than the features the scores came from.

    Patch truth takes each patch's level-0 size from ``--features``; another tiling (mpp, patch size, overlap)
    would measure tumor overlap over the wrong squares. The encoder may differ: only geometry is read here.
    """
    scored = scored_feature_settings(score_files) or {}
    refuse_other_features({k: v for k, v in scored.items() if k in TILING}, folder_settings(features_folder),
                          str(features_folder),
                          "the patch scores came from features with",
                          "pass --features tiled like the features the scored model read")


def evaluate_patches(scores_folder: str | Path, features_folder: str | Path, annotations_folder: str | Path,
                     slide_labels: dict[str, int], min_overlap: float = 0.5, top_k: int = 10,
                     score: str = "instance", slide_ids: set[str] | None = None,
                     size_level0: int | None = None) -> dict[str, Any]:
    """The ``patch`` section of metrics.json for every slide with patch scores (optionally a subset)."""
    from features.annotations import find_annotation

    if not 0.0 < min_overlap <= 1.0:
        raise InputError(f"--min_overlap {min_overlap}: must lie in (0, 1]")
    annotations_folder = Path(annotations_folder)
    if not annotations_folder.is_dir():
        raise InputError(f"{annotations_folder}: annotation folder not found; pass the folder of XML/GeoJSON files")
    score_files = find_patch_scores(scores_folder)
    check_same_tiling(score_files, features_folder)
    feature_files = find_feature_files(features_folder, check=False)  # the check above read every file's settings
    truths, skipped = [], {}
    for slide_id, path in score_files.items():
        if slide_ids is not None and slide_id not in slide_ids:
            continue
        if slide_id not in feature_files:
            skipped[slide_id] = "no features file (needed for the patch geometry)"
            continue
        coords, values = read_patch_scores(path, score)
        truth = slide_truth(slide_id, coords, values, patch_size_level0(feature_files[slide_id], size_level0),
                            find_annotation(annotations_folder, slide_id), slide_labels.get(slide_id), min_overlap)
        if truth is None:
            skipped[slide_id] = "positive or unlabelled slide without annotations"
        else:
            truths.append(truth)
    section = patch_metrics(truths, top_k)
    section.update({"score": score, "min_overlap": min_overlap, "skipped": skipped,
                    "annotations": str(annotations_folder)})
    return section


def format_patch_table(section: dict[str, Any]) -> str:
    """A readable summary of the ``patch`` section."""
    def fmt(value: Any) -> str:
        return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    k = section.get("top_k")
    rows = [
        ("slides with patch truth", section.get("n_slides")),
        ("  with tumor patches", section.get("n_tumor_slides")),
        ("patches (tumor / look-alike)",
         f"{section.get('n_patches')} ({section.get('n_tumor_patches')} / {section.get('n_lookalike_patches')})"),
        ("pooled patch AUC", section.get("pooled_auc")),
        ("mean per-tumor-slide AUC", section.get("mean_slide_auc")),
        (f"recall of tumor patches in top-{k}", section.get("mean_recall_at_k")),
        (f"precision of top-{k}", section.get("mean_precision_at_k")),
        ("tumor vs look-alike AUC", section.get("tumor_vs_lookalike_auc")),
    ]
    lines = [f"patch metrics ({section.get('score')}, tumor = overlap >= {section.get('min_overlap')})", "",
             "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {fmt(value)} |" for name, value in rows]
    if section.get("skipped"):
        lines.append(f"skipped {len(section['skipped'])} slide(s): "
                     + "; ".join(f"{k}: {v}" for k, v in list(section["skipped"].items())[:5]))
    return "\n".join(lines)
