"""Deep Zoom tiles and patch thumbnails, read through OpenSlide and kept in an LRU cache of encoded bytes.

One ``OpenSlide`` handle and one ``DeepZoomGenerator`` per slide, opened on first use and shared by the
server's threads (OpenSlide reads are thread-safe). A tile request names a level, column and row; anything
out of range is refused before OpenSlide is asked, so a URL cannot make it read outside the pyramid.
"""

from __future__ import annotations

import io
import threading
from functools import lru_cache
from pathlib import Path

from openslide import OpenSlide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

TILE_SIZE = 224
OVERLAP = 0
CACHE_TILES = 4096
JPEG_QUALITY = 80
THUMBNAIL = 128


class OutOfRange(LookupError):
    """A tile or patch outside the slide: the server answers 404."""


class SlideTiles:
    """Tiles of the slides in ``paths`` (slide_id -> file), encoded as JPEG, cached by (slide, level, col, row)."""

    def __init__(self, paths: dict[str, Path], tile_size: int = TILE_SIZE, overlap: int = OVERLAP,
                 cache_tiles: int = CACHE_TILES, quality: int = JPEG_QUALITY):
        self.paths = dict(paths)
        self.tile_size, self.overlap, self.quality = tile_size, overlap, quality
        self._slides: dict[str, OpenSlide] = {}
        self._generators: dict[str, DeepZoomGenerator] = {}
        self._lock = threading.Lock()
        self.tile = lru_cache(maxsize=cache_tiles)(self._render_tile)

    def slide(self, slide_id: str) -> OpenSlide:
        self.generator(slide_id)
        return self._slides[slide_id]

    def generator(self, slide_id: str) -> DeepZoomGenerator:
        if slide_id not in self.paths:
            raise OutOfRange(slide_id)
        with self._lock:
            if slide_id not in self._generators:
                slide = OpenSlide(str(self.paths[slide_id]))
                self._slides[slide_id] = slide
                self._generators[slide_id] = DeepZoomGenerator(slide, self.tile_size, self.overlap,
                                                               limit_bounds=False)
            return self._generators[slide_id]

    def dzi(self, slide_id: str) -> str:
        return self.generator(slide_id).get_dzi("jpeg")

    def dimensions(self, slide_id: str) -> tuple[int, int]:
        return tuple(self.slide(slide_id).dimensions)

    def check(self, slide_id: str, level: int, col: int, row: int) -> None:
        generator = self.generator(slide_id)
        if not 0 <= level < generator.level_count:
            raise OutOfRange(f"level {level}")
        cols, rows = generator.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise OutOfRange(f"tile {col}_{row} at level {level}")

    def _render_tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        self.check(slide_id, level, col, row)
        image = self.generator(slide_id).get_tile(level, (col, row))
        return _jpeg(image, self.quality)

    def patch(self, slide_id: str, x: int, y: int, size_level0: int, out: int = THUMBNAIL) -> bytes:
        """A patch's pixels at the pyramid level closest to ``out`` pixels per side, as JPEG."""
        slide = self.slide(slide_id)
        width, height = slide.dimensions
        if not (0 <= x < width and 0 <= y < height):
            raise OutOfRange(f"patch at {x},{y}")
        level = slide.get_best_level_for_downsample(max(1.0, size_level0 / out))
        side = max(1, int(round(size_level0 / slide.level_downsamples[level])))
        image = slide.read_region((x, y), level, (side, side)).convert("RGB").resize((out, out))
        return _jpeg(image, self.quality)

    def close(self) -> None:
        with self._lock:
            for slide in self._slides.values():
                slide.close()
            self._slides.clear()
            self._generators.clear()
            self.tile.cache_clear()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
