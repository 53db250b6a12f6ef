"""``MILDataModule``: a labels CSV plus a feature folder (ours, CLAM ``h5_files/`` or TRIDENT ``features_*/``).

Everything that can be wrong with the inputs is checked when the module is built, before any training: the
slide lists are matched, every bag's shape is read from its HDF5 header (cheap: no features are loaded), and
each split that trains or selects a model must hold both classes. ``feature_dim`` and ``num_classes`` are
linked into the model by the CLI, and ``pos_weight`` (negatives / positives in the training split) feeds the
bag loss, so neither is typed by hand.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Literal

import h5py
import pandas as pd
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from features.errors import InputError
from features.provenance import refuse_other_features
from features.store import file_settings, find_feature_files
from mil.data.bags import BagDataset, BagItem, BalancedSampler, PairBatchSampler, collate_bags
from mil.data.labels import check_classes, match_features, read_labels, split_of

Split = Literal["train", "val", "test"]
FEATURES_FIX = ("pass the --data.features the model was trained on, or fit a new run (another "
                "--trainer.default_root_dir)")


class MILDataModule(LightningDataModule):
    """Bags of one cohort, split by the labels CSV's ``split`` column or its ``fold_<k>`` column."""

    def __init__(
        self,
        features: str,
        labels: str,
        fold: int | None = None,
        label_map: dict[str, int] | None = None,
        max_patches_train: int | None = None,
        batch_size: int = 1,
        balanced_sampling: bool = False,
        pair_batches: bool = False,
        cache_gb: float = 0.0,
        num_workers: int = 0,
        predict_split: Literal["all", "train", "val", "test"] = "all",
        drop_missing: bool = False,
        seed: int = 0,
    ):
        """
        Args:
            features: Feature folder: ``<out>/features/<tag>``, ``<out>``, a CLAM results folder or TRIDENT folder.
            labels: Labels CSV (slide_id,label[,case_id,site,split|fold_0..fold_K]).
            fold: Which ``fold_<k>`` column to use; None uses the ``split`` column.
            label_map: String label -> class index; default normal/negative -> 0, tumor/positive -> 1.
            max_patches_train: Random cap of patches per training bag (None = all).
            batch_size: Bags per batch (padded, with a mask).
            balanced_sampling: Draw training slides with equal class probability.
            pair_batches: Training batches of batch_size//2 (at least 1) tumor + as many normal slides, so the
                ranking loss always has pairs.
            cache_gb: Keep bags in memory up to this many GB per worker (0 = always stream from disk).
            num_workers: DataLoader worker processes.
            predict_split: Slides scored by ``predict``.
            drop_missing: Skip labelled slides without features (with a warning) instead of failing.
            seed: Seed of the training samplers.
        """
        super().__init__()
        self.save_hyperparameters()  # the data settings travel with every checkpoint and into the loggers
        if balanced_sampling and pair_batches:
            raise InputError("choose one of --data.balanced_sampling and --data.pair_batches")
        self.features = features
        self.labels_csv = labels
        self.fold = fold
        self.label_map = label_map
        self.max_patches_train = max_patches_train
        self.batch_size = batch_size
        self.balanced_sampling = balanced_sampling
        self.pair_batches = pair_batches
        self.cache_bytes = int(cache_gb * 1e9)
        self.num_workers = num_workers
        self.predict_split = predict_split
        self.drop_missing = drop_missing
        self.seed = seed
        self.table  # noqa: B018 - validate the inputs now, before a model or trainer is built

    @cached_property
    def table(self) -> pd.DataFrame:
        """slide_id, label, split, path, n_patches for every usable slide."""
        frame = read_labels(self.labels_csv, self.label_map)
        split = split_of(frame, self.fold, self.labels_csv)  # on every row, so an error names the CSV's line
        files = find_feature_files(self.features)
        frame = match_features(frame, files, self.labels_csv, self.features, self.drop_missing)
        frame = frame.assign(split=split.loc[frame.index].to_numpy(), path=[files[s] for s in frame.index])
        shapes = {s: _bag_shape(p) for s, p in zip(frame.index, frame["path"])}
        empty = [s for s, (n, _) in shapes.items() if n == 0]
        if empty:
            raise InputError(f"{files[empty[0]]}: bag is empty (no patches); remove {len(empty)} empty slide(s) "
                             f"({', '.join(empty[:5])}) from {self.labels_csv} or re-extract with other tissue settings")
        dims = {s: d for s, (_, d) in shapes.items()}
        if len(set(dims.values())) > 1:
            first = next(iter(dims))
            other = next(s for s in dims if dims[s] != dims[first])
            raise InputError(f"{files[other]}: feature dim {dims[other]} differs from {dims[first]} in {files[first]}; "
                             "use features from one encoder")
        frame["n_patches"] = [shapes[s][0] for s in frame.index]
        frame["feature_dim"] = [dims[s] for s in frame.index]
        self._check_splits(frame)
        return frame

    def _check_splits(self, frame: pd.DataFrame) -> None:
        classes = self._classes(frame)
        for split in ("train", "val"):
            labels = frame.loc[frame["split"] == split, "label"]
            if labels.empty:
                raise InputError(f"{self.labels_csv}: no slide in the {split} split (fold {self.fold}) has features; "
                                 "run `mil split` or check the split column")
            check_classes(labels, split, self.labels_csv, classes)
        test = frame.loc[frame["split"] == "test", "label"]
        if len(test) and test.nunique() < 2:
            warnings.warn(f"{self.labels_csv}: the test split holds one class; test AUC is undefined", stacklevel=2)

    def _classes(self, frame: pd.DataFrame) -> int:
        mapped = set(self.label_map.values()) if self.label_map else set()
        return max(2, int(frame["label"].max()) + 1, len(mapped), max(mapped, default=0) + 1)

    @cached_property
    def feature_settings(self) -> dict:
        """The settings that made the features (encoder, its weights' checksum, tiling, views, dtype).

        One file speaks for the folder, whose files were checked to agree. Checkpoints carry it (``state_dict``)
        and patch scores record it, so a model is never applied, resumed or mined on features of another make.
        """
        return file_settings(Path(self.table["path"].iloc[0]))

    def state_dict(self) -> dict:
        return {"feature_settings": self.feature_settings}

    def load_state_dict(self, state_dict: dict) -> None:
        """Refuse a checkpoint whose model was trained on other features than ``--data.features`` holds."""
        refuse_other_features(state_dict.get("feature_settings"), self.feature_settings, self.features,
                              "the checkpoint's model was trained on", FEATURES_FIX)

    @property
    def feature_dim(self) -> int:
        return int(self.table["feature_dim"].iloc[0])

    @property
    def num_classes(self) -> int:
        return self._classes(self.table)

    @property
    def pos_weight(self) -> float | None:
        """Negatives / positives among training slides (binary only), the usual weight for an imbalanced BCE."""
        if self.num_classes != 2:
            return None
        train = self.table.loc[self.table["split"] == "train", "label"]
        return float((train == 0).sum() / max(1, (train == 1).sum()))

    def items(self, split: str) -> list[BagItem]:
        rows = self.table if split == "all" else self.table[self.table["split"] == split]
        return [BagItem(s, Path(p), int(y)) for s, p, y in zip(rows.index, rows["path"], rows["label"])]

    def split_of_slide(self, slide_id: str) -> str:
        return str(self.table.at[slide_id, "split"])

    def train_dataloader(self) -> DataLoader:
        dataset = BagDataset(self.items("train"), self.max_patches_train, self.cache_bytes)
        if self.pair_batches:
            sampler = PairBatchSampler(dataset.labels, max(1, self.batch_size // 2), self.seed)
            return self._loader(dataset, batch_sampler=sampler)
        if self.balanced_sampling:
            return self._loader(dataset, batch_size=self.batch_size, sampler=BalancedSampler(dataset.labels, self.seed))
        return self._loader(dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_split)

    def _eval_loader(self, split: str) -> DataLoader:
        items = self.items(split)
        if not items:
            raise InputError(f"{self.labels_csv}: no slide in the {split} split (fold {self.fold}) to evaluate")
        return self._loader(BagDataset(items, None, self.cache_bytes), batch_size=self.batch_size, shuffle=False)

    def _loader(self, dataset: BagDataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, collate_fn=collate_bags,
                          persistent_workers=self.num_workers > 0, **kwargs)

    def describe(self) -> Mapping[str, int]:
        return self.table.groupby("split").size().to_dict()


def _bag_shape(path: Path) -> tuple[int, int]:
    """(N, D) of a features file from its header, for our (N, D) and CLAM/TRIDENT (1, N, D) layouts."""
    try:
        with h5py.File(path, "r") as h5:
            if "features" not in h5:
                raise InputError(f"{path}: has no 'features' dataset; run `features extract`")
            shape = h5["features"].shape
    except OSError as error:
        raise InputError(f"{path}: cannot read HDF5 ({error}); delete the file and rerun extraction")
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise InputError(f"{path}: features have shape {shape}; expected (N, D)")
    return int(shape[0]), int(shape[1])
