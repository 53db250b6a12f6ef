"""Synthetic labelled embeddings for the patch-head tests, written to real feature-store files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fixtures import write_bag


def mitosis_like(n_pos: int = 60, n_imposter: int = 60, n_random: int = 400, dim: int = 12,
                 seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Embeddings where positives differ from imposters only along dim 1, and from random negatives along dim 0.

    Random negatives are easy (far along dim 0) and many; imposters sit next to the positives and differ only
    along dim 1, so a head that sees few of them learns dim 0 alone and calls imposters positive.
    """
    rng = np.random.default_rng(seed)
    groups = [("positive", 1, n_pos, (3.0, 0.8)), ("imposter", 0, n_imposter, (3.0, -0.8)),
              ("random", 0, n_random, (-2.0, 0.0))]
    features, rows = [], []
    for source, label, count, (shift0, shift1) in groups:
        block = rng.normal(size=(count, dim)).astype(np.float32)
        block[:, 0] += shift0
        block[:, 1] += shift1
        features.append(block)
        rows += [(source, label)] * count
    table = pd.DataFrame(rows, columns=["source", "label"])
    table["split"] = rng.choice(["train", "train", "val", "test"], size=len(table))
    return np.concatenate(features), table


def store_embeddings(folder: str | Path, features: np.ndarray, table: pd.DataFrame, n_images: int = 3,
                     views: np.ndarray | None = None) -> pd.DataFrame:
    """Write the rows as ``n_images`` feature files (features/<tag>/<image>.h5); returns the table with image, x, y."""
    folder = Path(folder)
    table = table.copy()
    table["image"] = [f"img{i % n_images}" for i in range(len(table))]
    table["x"], table["y"] = 0, 0
    for image, rows in table.groupby("image").groups.items():
        rows = np.asarray(rows)
        coords = np.stack([np.arange(len(rows)) * 64, np.full(len(rows), 32)], axis=1)
        table.loc[rows, "x"], table.loc[rows, "y"] = coords[:, 0], coords[:, 1]
        write_bag(folder / f"{image}.h5", features[rows], coords=coords, patch_size_level0=64,
                  views=None if views is None else views[:, rows].astype(np.float32))
    return table



def point_cohort_like(n_images: int = 30, figures: int = 4, imposters: int = 4, random: int = 40, dim: int = 12,
                      seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Embeddings shaped like a hard point cohort: rare look-alikes among many easy negatives, split by image.

    Dim 0 is "a dark object is there": figures and imposters have it, random patches do not. Dim 1 is granular
    texture: among dark objects it marks a figure (imposters are smooth), but random tissue is more granular
    still. Over all negatives, texture therefore looks like a *negative* cue, and a linear head trained on every
    negative (or on a random share of them) learns it with the wrong sign for the one comparison that matters at
    a high threshold, figure vs imposter. Imposters are about 9% of the negatives.
    """
    rng = np.random.default_rng(seed)
    splits = np.array(["train"] * (n_images - 2 * (n_images // 5)) + ["val", "test"] * (n_images // 5))
    centres = {"positive": (3.0, 1.2), "imposter": (3.0, -1.2), "random": (-3.0, 3.0)}
    features, rows = [], []
    for image, split in enumerate(rng.permutation(splits)):
        for source, label, count in (("positive", 1, figures), ("imposter", 0, imposters), ("random", 0, random)):
            block = rng.normal(size=(count, dim))
            block[:, :2] += centres[source]
            features.append(block.astype(np.float32))
            rows += [(f"img{image:02d}", split, source, label)] * count
    return np.concatenate(features), pd.DataFrame(rows, columns=["image", "split", "source", "label"])
