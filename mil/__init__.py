"""Bags of embeddings to slide models: data, aggregators, losses, training, evaluation, heatmaps and mining."""

from features import __version__

__all__ = ["__version__"]
