"""Patch label sources, all producing one table: ``image, x, y, label, source`` (+ ``split`` and extras).

- polygons: patches of a tiled slide labelled by their overlap with annotated regions;
- points: candidates centred on annotated points, with negatives (:mod:`features.heads.points`);
- image folders: ``root/<class>/*.png``, one image per patch, read directly through the encoder transform.

``x, y`` are the level-0 top-left corners used by the feature store, so a table row finds its embedding by
``(image, x, y)``; for image folders ``image`` is the file path and ``x = y = 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import Dataset

from features.errors import InputError
from features.store import atomic_path

TABLE_COLUMNS = ("image", "x", "y", "label", "source")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")


def validate_table(table: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{source}: patch table lacks columns {missing}; expected {','.join(TABLE_COLUMNS)}")
    table = table.copy()
    table["image"] = table["image"].astype(str)
    table[["x", "y"]] = table[["x", "y"]].astype("int64")
    return table.reset_index(drop=True)


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: patch table not found; write one with columns {','.join(TABLE_COLUMNS)}")
    return validate_table(pd.read_csv(path, dtype={"image": str}), str(path))


def write_table(path: str | Path, table: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        validate_table(table, str(path)).to_csv(tmp, index=False)
    return Path(path)


def assign_splits(table: pd.DataFrame, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                  seed: int = 0) -> pd.DataFrame:
    """Add a ``split`` column by whole images (patches of one image never straddle splits); keeps one present."""
    if "split" in table.columns:
        return table
    images = np.array(sorted(table["image"].unique()))
    rng = np.random.default_rng(seed)
    rng.shuffle(images)
    cuts = np.cumsum(np.asarray(fractions) / sum(fractions))[:2] * len(images)
    names = np.array(SPLITS)[np.searchsorted(np.rint(cuts), np.arange(len(images)), side="right")]
    return table.assign(split=table["image"].map(dict(zip(images, names))))


def stratified_splits(table: pd.DataFrame, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                      seed: int = 0) -> pd.DataFrame:
    """Per-row split stratified by label, for sources where each row is its own image (image folders)."""
    if "split" in table.columns:
        return table
    rng = np.random.default_rng(seed)
    split = np.empty(len(table), dtype=object)
    for _, rows in table.groupby("label").groups.items():
        rows = rng.permutation(np.asarray(rows))
        cuts = np.rint(np.cumsum(np.asarray(fractions) / sum(fractions))[:2] * len(rows)).astype(int)
        for name, part in zip(SPLITS, np.split(rows, cuts)):
            split[part] = name
    return table.assign(split=split)


def folder_table(root: str | Path) -> pd.DataFrame:
    """``root/<class>/*.png`` -> one row per image, labelled by its folder name."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: image folder not found; pass a folder with one sub-folder per class")
    rows = [(str(path), 0, 0, folder.name, "folder")
            for folder in sorted(p for p in root.iterdir() if p.is_dir())
            for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    if table["label"].nunique() < 2:
        raise InputError(f"{root}: needs images in at least two class folders (root/<class>/*.png)")
    return table


class ImageFolderDataset(Dataset):
    """Images of a folder table through an encoder transform; yields ``(tensor, index)`` like PatchDataset."""

    def __init__(self, paths: list[str], transform: Callable[[Image.Image], Any]):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            with Image.open(self.paths[index]) as image:
                return self.transform(image.convert("RGB")), index
        except OSError as error:
            raise InputError(f"{self.paths[index]}: cannot read image ({error}); remove or replace it") from None


def polygon_table(coords_dir: str | Path, annotations_dir: str | Path, min_overlap: float = 0.5,
                  max_negative_overlap: float = 0.0) -> pd.DataFrame:
    """Tiled slides labelled by annotated regions: positive at >= ``min_overlap`` of the patch area, negative at
    <= ``max_negative_overlap``; patches in between are ambiguous and left out.

    ``coords_dir`` holds ``<slide_id>.h5`` coords (or features) files; ``annotations_dir`` holds one
    ``<slide_id>.xml`` (ASAP) or ``.geojson`` (QuPath) per annotated slide. Slides without an annotation file
    are all negative (as in Camelyon16 normal slides).
    """
    from features.annotations import find_annotation, patch_overlap, read_polygons
    from features.store import h5_files, read_coords

    coords_dir, annotations_dir = Path(coords_dir), Path(annotations_dir)
    files = h5_files(coords_dir)
    if not files:
        raise InputError(f"{coords_dir}: no coords files; run `features tile` first")
    parts = []
    for path in files:
        coords, attrs = read_coords(path)
        found = find_annotation(annotations_dir, path.stem)
        overlap = (patch_overlap(read_polygons(found), coords, int(attrs["patch_size_level0"])) if found
                   else np.zeros(len(coords)))
        keep = (overlap >= min_overlap) | (overlap <= max_negative_overlap)
        parts.append(pd.DataFrame({"image": path.stem, "x": coords[keep, 0], "y": coords[keep, 1],
                                   "label": (overlap[keep] >= min_overlap).astype(np.int64), "source": "polygon",
                                   "overlap": overlap[keep]}))
    return pd.concat(parts, ignore_index=True)
