"""Slide-level aggregators, one per file, all behind ``Aggregator.forward(x, mask) -> AggregatorOutput``."""

from mil.aggregators.abmil import ABMIL
from mil.aggregators.base import Aggregator, AggregatorOutput
from mil.aggregators.clam import CLAMSB
from mil.aggregators.dsmil import DSMIL
from mil.aggregators.max_pool import MaxPool
from mil.aggregators.mean_pool import MeanPool
from mil.aggregators.transmil import TransMIL

__all__ = ["ABMIL", "Aggregator", "AggregatorOutput", "CLAMSB", "DSMIL", "MaxPool", "MeanPool", "TransMIL"]
