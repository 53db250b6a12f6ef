"""``features tile`` and ``features extract``: slides -> patch coordinates -> embeddings, one HDF5 file per slide.

``extract`` holds the per-slide loop, ``views`` the test-time augmentations, ``distributed`` the sharding of
slides over processes, ``cli`` the two commands.
"""

from features.extraction.extract import ExtractOptions, SlideExtractor, TileOptions, tile

__all__ = ["ExtractOptions", "SlideExtractor", "TileOptions", "tile"]
