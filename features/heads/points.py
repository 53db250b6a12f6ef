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


SPLITS = ("train", "val", "test", "unlabeled")
# MIDOG++ names its classes "mitotic figure" and "hard negative"; MIDOG 2021 and others say "not mitotic figure".
DEFAULT_CATEGORIES = {"mitotic figure": 1, "hard negative": 0, "not mitotic figure": 0, "non-mitotic figure": 0,
                      "imposter": 0}


def read_coco_images(path: str | Path, image_dir: str | Path | None = None, splits: str | Path | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """Image records of a COCO JSON: file_name, width, height, mpp, mpp_source, split.

    The JSON as MIDOG++ distributes it has neither ``mpp`` nor ``split``: a missing mpp is read from the image
    file in ``image_dir`` (:func:`image_mpp`), ``mpp_source`` says where each came from; splits come from the
    ``splits`` CSV (``file_name,split``), else from the JSON, else images are split with ``seed``
    (:func:`split_images`).
    """
    path = Path(path)
    try:
        images = json.loads(path.read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a COCO JSON with an 'images' list ({error}); pass the annotation file")
    table = pd.DataFrame(images)
    for column in ("file_name", "width", "height"):
        if column not in table.columns:
            raise InputError(f"{path}: images lack '{column}'; every COCO image needs file_name, width, height")
    table = table.assign(mpp=pd.to_numeric(table.get("mpp"), errors="coerce"), mpp_source="json")
    for index in np.flatnonzero(table["mpp"].isna().to_numpy()):
        file_name = table.at[index, "file_name"]
        if image_dir is None:
            raise InputError(f"{path}: image {file_name!r} has no 'mpp'; pass --data.image_dir to read it from the "
                             "image file, or add 'mpp' to the JSON")
        table.at[index, "mpp"], table.at[index, "mpp_source"] = image_mpp(Path(image_dir) / file_name)
    if splits is not None:
        table["split"] = splits_from_csv(splits, table["file_name"])
    elif "split" not in table.columns or table["split"].isna().any():
        table["split"] = split_images(table["file_name"], seed)
    return table[["file_name", "width", "height", "mpp", "mpp_source", "split"]].reset_index(drop=True)


def image_mpp(path: Path) -> tuple[float, str]:
    """(microns per pixel, where it came from) of an image file: OpenSlide's properties, else TIFF resolution tags."""
    from features.slides import PLAUSIBLE_MPP, metadata_mpp, open_slide

    if not path.is_file():
        raise InputError(f"{path}: image not found; pass the folder holding the COCO images as --data.image_dir")
    try:
        slide = open_slide(path)
    except InputError:
        slide = None
    if slide is not None:
        try:
            mpp = metadata_mpp(slide)
        finally:
            slide.close()
        if mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
            return float(mpp), "image metadata (openslide)"
    mpp = _tiff_tag_mpp(path)
    if mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return mpp, "image metadata (tiff resolution tags)"
    raise InputError(f"{path}: no plausible microns-per-pixel in the image's metadata; add 'mpp' to this image "
                     "in the COCO JSON")


def _tiff_tag_mpp(path: Path) -> float | None:
    """Microns per pixel from a TIFF's XResolution / ResolutionUnit (inch or centimetre), or None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            tags = tiff.pages[0].tags
            numerator, denominator = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    except (tifffile.TiffFileError, KeyError, OSError, ValueError, TypeError):
        return None
    per_micron = {2: 25400.0, 3: 10000.0}.get(unit)
    if not numerator or per_micron is None:
        return None
    return per_micron * denominator / numerator


def splits_from_csv(path: str | Path, file_names: pd.Series) -> pd.Series:
    """Each image's split from a ``file_name,split`` CSV; every image must be listed, with a known split."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read the splits CSV ({error}); write file_name,split rows")
    if not {"file_name", "split"} <= set(table.columns):
        raise InputError(f"{path}: needs columns file_name,split (found {list(table.columns)})")
    table["split"] = table["split"].str.strip().str.lower()
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise InputError(f"{path}: unknown split(s) {bad}; use {', '.join(SPLITS)}")
    lookup = dict(zip(table["file_name"].str.strip(), table["split"]))
    missing = [f for f in file_names if f not in lookup]
    if missing:
        raise InputError(f"{path}: no split for image {missing[0]!r} ({len(missing)} missing); add a row for it")
    return file_names.map(lookup)


def split_images(file_names: pd.Series, seed: int = 0, val: float = 0.2, test: float = 0.2) -> pd.Series:
    """A seeded split by image (never by patch, so no image's patches land on both sides): about 60/20/20."""
    n = len(file_names)
    n_val = max(1, round(val * n)) if n >= 3 else 0
    n_test = max(1, round(test * n)) if n >= 3 else 0
    names = np.array(["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test), dtype=object)
    order = np.random.default_rng(seed).permutation(n)
    splits = np.empty(n, dtype=object)
    splits[order] = names
    return pd.Series(splits, index=file_names.index)


def read_coco_points(path: str | Path, categories: dict[str, int] | None = None) -> pd.DataFrame:
    """Points (file_name, x, y, label 0/1) through the shared annotation reader (box centres, ``[x1, y1, x2, y2]``).

    ``categories`` maps each category name (case-insensitive) to its label; an unmapped name is refused.
    """
    from features.annotations import read_points

    mapping = {str(k).strip().lower(): int(v) for k, v in (categories or DEFAULT_CATEGORIES).items()}
    points = read_points(path)
    unknown = sorted(set(points["category"]) - set(mapping))
    if unknown:
        raise InputError(f"{path}: categories {unknown} have no label; map them with --data.categories "
                         f"(now {mapping})")
    return points.assign(label=points["category"].map(mapping).astype(np.int64))[["file_name", "x", "y", "label"]]


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
        "mpp_source": getattr(image, "mpp_source", "json"),
    })
