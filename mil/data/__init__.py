"""Labels, splits and streamed bags of patch embeddings."""

from mil.data.bags import BagDataset, BagItem, BalancedSampler, PairBatchSampler, collate_bags
from mil.data.datamodule import MILDataModule
from mil.data.labels import DEFAULT_LABEL_MAP, read_labels

__all__ = ["BagDataset", "BagItem", "BalancedSampler", "DEFAULT_LABEL_MAP", "MILDataModule", "PairBatchSampler",
           "collate_bags", "read_labels"]
