"""Stored embeddings joined to a patch table, and the dataset that samples among augmented views.

An :class:`EmbeddingSet` is what every head, probe and regime search trains on: rows of the patch table
(image, x, y, label, source, split ...) with their embedding ``features`` (N, D) and, when extraction stored
them, ``views`` (V, N, D) of V augmented versions of the same patch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from features.errors import InputError
from features.store import find_feature_files, read_bag, rows_at


@dataclass
class EmbeddingSet:
    features: np.ndarray            # (N, D) float32: the clean (or D4-averaged) embedding of each patch
    labels: np.ndarray              # (N,) int64 class indices
    table: pd.DataFrame             # one row per patch, index 0..N-1
    views: np.ndarray | None = None  # (V, N, D) embeddings of augmented views
    classes: tuple[str, ...] = ("0", "1")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def subset(self, rows: np.ndarray) -> "EmbeddingSet":
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return replace(self, features=self.features[rows], labels=self.labels[rows],
                       table=self.table.iloc[rows].reset_index(drop=True),
                       views=None if self.views is None else self.views[:, rows])

    def split(self, name: str) -> "EmbeddingSet":
        if "split" not in self.table.columns:
            raise InputError("patch table has no 'split' column; add train/val/test per row or image")
        return self.subset(self.table["split"].to_numpy() == name)


def encode_labels(values: pd.Series) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integers stay as they are (0..C-1); strings map to indices in sorted order."""
    if pd.api.types.is_integer_dtype(values):
        n = int(values.max()) + 1 if len(values) else 2
        return values.to_numpy(np.int64), tuple(str(i) for i in range(max(n, 2)))
    classes = tuple(sorted(values.astype(str).unique()))
    lookup = {name: index for index, name in enumerate(classes)}
    return values.astype(str).map(lookup).to_numpy(np.int64), classes


def load_embeddings(features_dir: str | Path, table: pd.DataFrame, with_views: bool = True) -> EmbeddingSet:
    """Look up each table row's embedding by (image, x, y) in the per-image feature files."""
    files = find_feature_files(features_dir)
    table = table.reset_index(drop=True)
    features: np.ndarray | None = None
    views: np.ndarray | None = None
    for image, rows in table.groupby("image", sort=False).groups.items():
        if str(image) not in files:
            raise InputError(f"{features_dir}: no features file for image {image!r}; embed the patch table first")
        bag = read_bag(files[str(image)], with_views=with_views)
        found = rows_at(bag.coords, table.loc[rows, ["x", "y"]].to_numpy(np.int64), files[str(image)],
                        "re-embed with the same patch table")
        if features is None:
            features = np.zeros((len(table), bag.features.shape[1]), dtype=np.float32)
            if bag.views is not None:
                views = np.zeros((bag.views.shape[0], len(table), bag.features.shape[1]), dtype=np.float32)
        features[np.asarray(rows)] = bag.features[found]
        if views is not None:
            if bag.views is None or bag.views.shape[0] != views.shape[0]:
                raise InputError(f"{files[str(image)]}: views missing or of another count; re-embed all images alike")
            views[:, np.asarray(rows)] = bag.views[:, found]
    if features is None:
        raise InputError("patch table is empty; nothing to train on")
    labels, classes = encode_labels(table["label"])
    return EmbeddingSet(features, labels, table, views, classes)


class ViewSamplingDataset(Dataset):
    """(embedding, label) pairs; with views, each access draws one stored view at random.

    Drawing per access (not once per epoch) means every epoch sees a fresh mix of views, at no extra cost.
    """

    def __init__(self, data: EmbeddingSet, view_sampling: bool = True, include_clean: bool = True, seed: int = 0):
        sampling = view_sampling and data.views is not None
        stacks = [data.features[None]] if include_clean or not sampling else []
        if sampling:
            stacks.append(data.views)
        self.stack = torch.from_numpy(np.concatenate(stacks, axis=0).astype(np.float32))  # (V', N, D)
        self.labels = torch.from_numpy(data.labels)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one indexing operation (DataLoader calls this when it exists)."""
        rows = torch.as_tensor(indices, dtype=torch.long)
        views = torch.randint(len(self.stack), (len(rows),), generator=self.generator)
        return self.stack[views, rows], self.labels[rows]


def as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :meth:`ViewSamplingDataset.__getitems__`, which already returns stacked tensors."""
    return batch
