"""Slides to embeddings: reading, tissue, tiling, encoders, extraction and the HDF5 feature store."""

from features.provenance import package_version

__version__ = package_version()
