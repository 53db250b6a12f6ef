"""Patch tables from point annotations (MIDOG-style COCO): candidates centred on points, plus negatives.

Rows, per image:
- ``positive``: a patch centred on each mitotic figure (label 1);
- ``imposter``: a patch centred on each annotated look-alike ("not mitotic figure", label 0), the
  fine-grained hard negatives of the dataset;
- ``random``: patches at random positions of labelled images, at least ``min_distance_um`` from every
  mitotic figure (label 0);
- ``unlabeled``: random patches of images without annotations (split ``unlabeled``), assumed negative
  because figures are rare; the regime search decides how many of them are worth training on.

Patch positions are stored as level-0 top-left corners (the store's convention) and the centre as ``cx, cy``;
the side in level-0 pixels follows from each image's mpp, so a patch covers the same microns everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from features.errors import InputError

POSITIVE_NAMES = {"mitotic figure", "mitotic_figure", "mitosis", "1", "true", "positive"}


@dataclass
class PointSampling:
    """Where candidate patches go; sizes in microns so they mean the same on every scanner."""

    target_mpp: float = 0.25
    """MIDOG images are scanned near 0.25 µm/px."""
    patch_size: int = 64
    """Pixels at target_mpp (16 µm: one figure and a margin)."""
    random_per_image: int = 20
    """Random background patches per image (negatives)."""
    unlabeled_per_image: int = 20
    """Random patches per unlabeled image."""
    min_distance_um: float = 15.0
    """Random negatives stay this far from any mitotic figure."""
    seed: int = 0
    """Seeds where random patches go."""


def read_coco_images(path: str | Path) -> pd.DataFrame:
    """Image records of a COCO JSON: file_name, width, height, mpp, split (``unlabeled`` when not given)."""
    path = Path(path)
    try:
        images = json.loads(path.read_text())["images"]
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{path}: not a COCO JSON with an 'images' list ({error}); pass the annotation file")
    table = pd.DataFrame(images)
    for column in ("file_name", "width", "height"):
        if column not in table.columns:
            raise InputError(f"{path}: images lack '{column}'; every COCO image needs file_name, width, height")
    if "mpp" not in table.columns or table["mpp"].isna().any():
        raise InputError(f"{path}: every image needs an 'mpp' (microns per pixel) to convert µm distances")
    if "split" not in table.columns:
        table["split"] = "train"
    return table[["file_name", "width", "height", "mpp", "split"]].reset_index(drop=True)


def read_coco_points(path: str | Path) -> pd.DataFrame:
    """Points (file_name, x, y, label 0/1) through the shared annotation reader."""
    from features.annotations import read_points

    points = read_points(path)
    labels = points["label"].astype(str).str.strip().str.lower()
    return points.assign(label=labels.isin(POSITIVE_NAMES).astype(np.int64))[["file_name", "x", "y", "label"]]


def side_level0(mpp: float, sampling: PointSampling) -> int:
    return max(1, int(round(sampling.patch_size * sampling.target_mpp / mpp)))


def point_table(points: pd.DataFrame, images: pd.DataFrame, sampling: PointSampling) -> pd.DataFrame:
    """Every candidate patch of every image: columns image, x, y, cx, cy, label, source, split, mpp."""
    rng = np.random.default_rng(sampling.seed)
    groups = dict(tuple(points.groupby("file_name", sort=False)))
    parts = []
    for image in images.itertuples(index=False):
        mine = groups.get(image.file_name, points.iloc[:0])
        side = side_level0(float(image.mpp), sampling)
        if image.split == "unlabeled":
            centres = random_centres(rng, image, side, sampling.unlabeled_per_image, np.zeros((0, 2)), 0.0)
            parts.append(_rows(image, centres, 0, "unlabeled", side))
            continue
        positives = mine.loc[mine["label"] == 1, ["x", "y"]].to_numpy(float)
        imposters = mine.loc[mine["label"] == 0, ["x", "y"]].to_numpy(float)
        min_px = sampling.min_distance_um / float(image.mpp)
        centres = random_centres(rng, image, side, sampling.random_per_image, positives, min_px)
        parts += [_rows(image, positives, 1, "positive", side), _rows(image, imposters, 0, "imposter", side),
                  _rows(image, centres, 0, "random", side)]
    table = pd.concat(parts, ignore_index=True)
    # Two candidates on the same patch would be one embedding with two labels; keep the first (positives first).
    return table.drop_duplicates(["image", "x", "y"]).reset_index(drop=True)


def random_centres(rng: np.random.Generator, image, side: int, count: int, avoid: np.ndarray,
                   min_px: float) -> np.ndarray:
    """Up to ``count`` centres whose patches lie inside the image and keep ``min_px`` from every ``avoid`` point."""
    low, high_x, high_y = side / 2, image.width - side / 2, image.height - side / 2
    if count <= 0 or high_x < low or high_y < low:
        return np.zeros((0, 2))
    tree = cKDTree(avoid) if len(avoid) else None
    kept: list[np.ndarray] = []
    for _ in range(20):  # rejection sampling: a few rounds suffice unless figures cover the image
        draws = np.column_stack([rng.uniform(low, high_x, 4 * count), rng.uniform(low, high_y, 4 * count)])
        if tree is not None:
            draws = draws[tree.query(draws)[0] >= min_px]
        kept.append(draws)
        if sum(map(len, kept)) >= count:
            break
    return np.concatenate(kept)[:count]


def _rows(image, centres: np.ndarray, label: int, source: str, side: int) -> pd.DataFrame:
    centres = np.asarray(centres, dtype=float).reshape(-1, 2)
    top_left = np.rint(centres - side / 2).astype(np.int64)
    return pd.DataFrame({
        "image": Path(image.file_name).stem, "file_name": image.file_name,
        "x": top_left[:, 0], "y": top_left[:, 1], "cx": centres[:, 0], "cy": centres[:, 1],
        "label": label, "source": source, "split": image.split, "mpp": float(image.mpp),
    })
