"""Bags of patch embeddings, read one slide at a time from the feature store, and how they are batched.

A bag is read from disk each time it is needed, so memory stays flat however many slides a cohort has; an
optional cache keeps whole bags in memory up to a byte budget (per worker process). Training can cap the
number of patches per bag with a random subset drawn from torch's generator, which ``seed_everything`` seeds
(per worker too), so runs repeat exactly. Batches of several bags are padded to the longest one with a boolean
mask: ``True`` marks real patches, and every aggregator ignores the rest.

Every read checks that the features it returns are finite (:func:`read_finite_bag`): one NaN or Inf row would
otherwise turn the standardisation statistics, the loss and every score into NaN, and a run would "finish" with
an AUC of 0. The check costs one ``np.isfinite`` over what is read anyway.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from features.errors import InputError
from features.store import FeatureBag, count_patches, read_bag


@dataclass(frozen=True)
class BagItem:
    """One labelled slide and where its features live."""

    slide_id: str
    path: Path
    label: int


class BagCache:
    """Whole bags kept in memory until ``budget_bytes`` is reached; later bags are simply not cached."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.used = 0
        self.bags: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.bags.get(key)

    def put(self, key: str, features: np.ndarray, coords: np.ndarray) -> None:
        size = features.nbytes + coords.nbytes
        if self.budget > 0 and self.used + size <= self.budget:
            self.bags[key] = (features, coords)
            self.used += size


class BagDataset(Dataset):
    """Slides -> (features (N, D) float32, coords (N, 2), label, slide_id), read lazily from HDF5."""

    def __init__(self, items: Sequence[BagItem], max_patches: int | None = None, cache_bytes: int = 0):
        self.items = list(items)
        self.max_patches = max_patches
        self.cache = BagCache(cache_bytes)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [item.label for item in self.items]

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        features, coords = self._read(item)
        return {
            "features": torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
            "coords": torch.from_numpy(coords),
            "label": item.label,
            "slide_id": item.slide_id,
        }

    def _read(self, item: BagItem) -> tuple[np.ndarray, np.ndarray]:
        cached = self.cache.get(item.slide_id)
        if cached is None and self.cache.budget > 0:
            bag = read_finite_bag(item.path, item.slide_id)
            self.cache.put(item.slide_id, bag.features, bag.coords)
            cached = (bag.features, bag.coords)
        if cached is not None:
            rows = self._rows(len(cached[0]))
            return (cached[0], cached[1]) if rows is None else (cached[0][rows], cached[1][rows])
        rows = self._rows(count_patches(item.path)) if self.max_patches else None
        bag = read_finite_bag(item.path, item.slide_id, rows=rows)
        return bag.features, bag.coords

    def _rows(self, n: int) -> np.ndarray | None:
        """A sorted random subset of ``max_patches`` rows (sorted: HDF5 reads need increasing indices)."""
        if not self.max_patches or n <= self.max_patches:
            return None
        return np.sort(torch.randperm(n)[: self.max_patches].numpy())


def read_finite_bag(path: Path, slide_id: str, rows: np.ndarray | None = None) -> FeatureBag:
    """``read_bag``, refusing features that hold NaN or Inf with one line naming the file and the first bad row."""
    bag = read_bag(path, slide_id, rows=rows)
    finite = np.isfinite(bag.features)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        first = int(bad[0] if rows is None else np.sort(np.asarray(rows))[bad[0]])
        x, y = (int(v) for v in bag.coords[bad[0]])
        raise InputError(f"{path}: features row {first} (patch at x={x}, y={y}) holds NaN or Inf"
                         f"{f' ({len(bad)} bad rows in what was read)' if len(bad) > 1 else ''}; delete the file and "
                         "rerun `features extract` for this slide, or drop the slide from the labels CSV")
    return bag


def collate_bags(items: list[dict]) -> dict:
    """Pad bags to the longest: features (B, N, D), mask (B, N), coords (B, N, 2) (-1 where padded)."""
    longest = max(len(item["features"]) for item in items)
    dim = items[0]["features"].shape[1]
    features = torch.zeros(len(items), longest, dim)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    coords = torch.full((len(items), longest, 2), -1, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["features"])
        features[row, :n] = item["features"]
        mask[row, :n] = True
        coords[row, :n] = item["coords"]
    return {
        "features": features,
        "mask": mask,
        "coords": coords,
        "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
        "slide_id": [item["slide_id"] for item in items],
    }


class BalancedSampler(Sampler[int]):
    """Draws slides with replacement so every class is equally likely; one epoch = one pass worth of draws."""

    def __init__(self, labels: Sequence[int], seed: int = 0):
        self.labels = np.asarray(labels)
        counts = np.bincount(self.labels)
        self.weights = torch.as_tensor(1.0 / counts[self.labels], dtype=torch.double)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        yield from torch.multinomial(self.weights, len(self.labels), replacement=True, generator=generator).tolist()


class PairBatchSampler(Sampler[list[int]]):
    """Batches of ``per_class`` tumor (label > 0) and ``per_class`` normal slides, as the ranking loss needs pairs.

    Each epoch shuffles both groups and cycles the smaller one, so every slide of the larger group is seen once.
    """

    def __init__(self, labels: Sequence[int], per_class: int = 1, seed: int = 0):
        labels = np.asarray(labels)
        self.positives = np.flatnonzero(labels > 0).tolist()
        self.negatives = np.flatnonzero(labels == 0).tolist()
        if not self.positives or not self.negatives:
            raise ValueError("pair batches need tumor and normal slides in the training split")
        self.per_class = max(1, per_class)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return -(-max(len(self.positives), len(self.negatives)) // self.per_class)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        positives, negatives = self._cycled(rng, self.positives), self._cycled(rng, self.negatives)
        for start in range(0, len(self) * self.per_class, self.per_class):
            yield positives[start:start + self.per_class] + negatives[start:start + self.per_class]

    def _cycled(self, rng: random.Random, group: list[int]) -> list[int]:
        needed = len(self) * self.per_class
        out: list[int] = []
        while len(out) < needed:
            out += rng.sample(group, len(group))
        return out[:needed]


def feature_statistics(items: list[BagItem], rows_per_bag: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the training patches (a seeded sample of each bag, one bag in memory at a time).

    Embeddings from random-init or unfamiliar encoders can be tiny or offset in some dimensions; standardising with
    statistics of the *training* split alone puts every encoder on one scale without peeking at val/test.
    """
    rng = np.random.default_rng(seed)
    total, total_sq, count = None, None, 0
    for item in items:
        n = count_patches(item.path)
        rows = np.sort(rng.choice(n, rows_per_bag, replace=False)) if n > rows_per_bag else None
        values = read_finite_bag(item.path, item.slide_id, rows=rows).features.astype(np.float64)  # only the sampled rows
        total = values.sum(0) if total is None else total + values.sum(0)
        total_sq = (values**2).sum(0) if total_sq is None else total_sq + (values**2).sum(0)
        count += len(values)
    if not count:
        raise ValueError("no training patches to compute feature statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)
