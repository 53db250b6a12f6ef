"""Normal-slide twins: a pseudo-positive candidate that looks like a patch of a normal slide is not trusted.

The slide model scores tumor look-alikes high when they are commoner on tumor slides than on normal ones (a
slide-level shortcut). Its top-scoring tumor-slide patches, the pseudo-positives, are then partly look-alikes,
and fine-tuning would pull look-alikes and tumor together. Slide labels hold the cure: tumor never occurs on a
normal slide, so a tumor-slide patch with a close twin among normal-slide patches in feature space is probably
not tumor, however the model scores it.

The test compares two distances in the round's (standardised) feature space, on equal-sized samples of
tumor-slide and normal-slide training patches: ``d_normal``, to the nearest normal-slide patch, and
``d_tumor``, to the ``k``-th nearest tumor-slide patch. A candidate is twin-free when
``d_normal > ratio * d_tumor``. Tumor has dense company on tumor slides and none on normal slides, so it
passes; a look-alike has its nearest twin on a normal slide about as close as its ``k``-th on a tumor slide
whenever it is less than ``k`` times commoner there, so it fails.

``k`` cannot exceed the number of tumor patches in the reference sample: with few tumor-slide patches (a small
cohort, a small tumor share, fewer normal-slide patches to match the sample size) even tumor has no ``k``
tumor-slide neighbours nearer than the nearest normal patch, and every candidate fails. Failed candidates are
never let back in (keeping them all would hand fine-tuning the whole confident pool, look-alikes included):
mining then falls back to each tumor slide's top patch and says so in one line. Halving ``k`` until some
candidates pass was tried and was less precise than that fallback (docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from features.errors import InputError
from features.store import find_feature_files, read_bag, read_coords, rows_at


@dataclass
class TwinFilter:
    """Settings of the twin test (``k = 0`` turns it off)."""

    k: int = 20
    """The tumor-slide neighbour rank compared with the nearest normal-slide patch."""
    ratio: float = 1.0
    """Twin-free when d_normal > ratio * d_tumor."""
    hard_negative_k: int = 0
    """A positive whose nearest hard negative is nearer than its ``k``-th nearest fellow positive is dropped (after
    the hard negatives are mined), unless that would leave fewer positives than training tumor slides; 0
    (default) = off. configs/demo/hnm.yaml uses 5: every refresh on the mimic preset then helped (docs/method.md)."""
    max_reference: int = 20_000
    """Patches sampled per class for the reference sets (memory bound)."""
    max_candidates: int = 50_000
    """Only the highest-scoring candidates are tested (memory and time bound on large cohorts); the rest are not used
    as positives. Self-paced ranking takes the top candidates anyway."""


def patch_features(features: str | Path, table: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """Feature vectors of ``table.iloc[rows]`` (slide_id, x, y), joined on coordinates, never on order.

    Only the rows asked for are read from each file, so a reference sample of a large cohort stays cheap.
    """
    files = find_feature_files(features)
    out: np.ndarray | None = None
    picked = table.iloc[rows]
    for slide_id, group in picked.groupby("slide_id", sort=True):
        if slide_id not in files:
            raise InputError(f"{features}: no features for training slide {slide_id}; pass the feature folder "
                             "the scored model was trained on")
        coords, _ = read_coords(files[slide_id])
        found = rows_at(coords, group[["x", "y"]].to_numpy(np.int64), files[slide_id],
                        "the scores and features come from different tilings")
        unique, inverse = np.unique(found, return_inverse=True)
        bag = read_bag(files[slide_id], slide_id, rows=unique)
        if out is None:
            out = np.zeros((len(picked), bag.features.shape[1]), dtype=np.float32)
        out[picked.index.get_indexer(group.index)] = bag.features[inverse]
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


@dataclass
class TwinResult:
    """The outcome of the twin test: which candidates are twin-free, and the label-free facts behind it."""

    free: np.ndarray
    """Boolean mask over the candidates: True where no normal-slide twin is near."""
    k: int
    """The tumor-slide neighbour rank used."""
    ran: bool = True
    """False when there were too few reference patches (or no candidates) to run it: every candidate is free."""

    @property
    def warning(self) -> str | None:
        """One line when every candidate failed (no annotations needed to see it)."""
        if not self.ran or len(self.free) == 0 or self.free.any():
            return None
        return (f"every one of the {len(self.free)} positive candidates has a normal-slide twin (twin test, "
                f"k={self.k}): none is trusted, so positives fall back to each tumor slide's top patch; with few "
                "tumor-slide patches a smaller mining.twins.k may be needed")

    def report(self) -> dict:
        """For selection_quality.json."""
        return {"k": self.k, "ran": self.ran, "candidates": int(len(self.free)), "passed": int(self.free.sum()),
                "warning": self.warning}


def twin_test(table: pd.DataFrame, candidates: np.ndarray, features: str | Path, config: TwinFilter,
              seed: int = 0) -> TwinResult:
    """Which ``candidates`` (row indices of ``table``) have no normal-slide twin near.

    Beyond ``max_candidates`` (by score) candidates are not tested and come back False.
    """
    if len(candidates) > config.max_candidates > 0:
        scores = table["score"].to_numpy()[candidates]
        tested = np.sort(np.argsort(-scores, kind="stable")[:config.max_candidates])
        inner = twin_test(table, candidates[tested], features, config, seed)
        mask = np.zeros(len(candidates), dtype=bool)
        mask[tested] = inner.free
        return TwinResult(mask, inner.k, inner.ran)
    labels = table["label"].to_numpy()
    tumor_rows, normal_rows = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n = min(len(tumor_rows), len(normal_rows), config.max_reference)
    if config.k <= 0 or len(candidates) == 0 or n <= config.k:
        return TwinResult(np.ones(len(candidates), dtype=bool), config.k, ran=False)
    rng = np.random.default_rng(seed)
    tumor_ref = np.sort(rng.choice(tumor_rows, size=n, replace=False))
    normal_ref = np.sort(rng.choice(normal_rows, size=n, replace=False))
    rows = np.unique(np.concatenate([candidates, tumor_ref, normal_ref]))  # sorted: rows of ``table``
    vectors = patch_features(features, table.reset_index(drop=True), rows)
    reference = vectors[np.searchsorted(rows, np.concatenate([tumor_ref, normal_ref]))]
    scaled = (vectors - reference.mean(axis=0)) / (reference.std(axis=0) + 1e-6)  # same scale for any candidates

    def at(which: np.ndarray) -> np.ndarray:
        return scaled[np.searchsorted(rows, which)]

    query = at(candidates)
    d_normal = NearestNeighbors(n_neighbors=1).fit(at(normal_ref)).kneighbors(query)[0][:, 0]
    tumor_index = NearestNeighbors(n_neighbors=config.k + 1).fit(at(tumor_ref))
    distances, neighbours = tumor_index.kneighbors(query)
    is_self = tumor_ref[neighbours] == candidates[:, None]  # a candidate in the reference is not its own company
    d_tumor = np.array([d[~s][config.k - 1] for d, s in zip(distances, is_self)])
    return TwinResult(d_normal > config.ratio * d_tumor, config.k)


def near_hard_negatives(table: pd.DataFrame, positives: np.ndarray, hard: np.ndarray, features: str | Path,
                        k: int) -> np.ndarray:
    """Boolean mask over ``positives`` (rows of ``table``): True where a hard negative is nearer than the ``k``-th
    nearest other positive, in the round's standardised features.

    Hard negatives are the normal-slide patches the model scores most tumor-like, so they sit where look-alikes
    are. A positive among them is most likely a look-alike too, and fine-tuning would be asked to pull it toward
    the positives while pushing its neighbours away: the contradiction that drags look-alikes and tumor together.
    Tumor has its fellow positives nearer (it clusters and never occurs on a normal slide). ``k`` is capped at
    the number of other positives; with fewer than two positives, or no hard negatives, nothing is flagged.
    """
    k = min(k, len(positives) - 1)
    if k < 1 or len(hard) == 0:
        return np.zeros(len(positives), dtype=bool)
    rows = np.unique(np.concatenate([positives, hard]))
    vectors = patch_features(features, table.reset_index(drop=True), rows)
    scaled = (vectors - vectors.mean(axis=0)) / (vectors.std(axis=0) + 1e-6)
    at = lambda which: scaled[np.searchsorted(rows, which)]  # noqa: E731
    fellows = NearestNeighbors(n_neighbors=k + 1).fit(at(positives)).kneighbors(at(positives))[0][:, k]
    nearest_hard = NearestNeighbors(n_neighbors=1).fit(at(hard)).kneighbors(at(positives))[0][:, 0]
    return nearest_hard < fellows
