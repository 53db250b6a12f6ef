"""Slides to embeddings: reading, tissue, tiling, encoders, extraction and the HDF5 feature store."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hnm-mil")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
