"""Patch pixels at the target resolution, and a dataset that reads them in DataLoader workers.

OpenSlide handles are not shareable across processes, so each worker opens its own lazily and keeps a few open
(an LRU cache): the same dataset serves one slide (extraction) or patches scattered over a cohort (fine-tuning).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import openslide
from PIL import Image
from torch.utils.data import Dataset

from features.errors import InputError
from features.slides import open_slide
from features.tiling import Geometry


@dataclass(frozen=True)
class PatchItem:
    """One patch to read: the slide file, the level-0 top-left corner and the slide's geometry."""

    slide_path: str
    x: int
    y: int
    geometry: Geometry


def items_for_slide(slide_path: str | os.PathLike, coords: np.ndarray, geometry: Geometry) -> list[PatchItem]:
    path = str(slide_path)
    return [PatchItem(path, int(x), int(y), geometry) for x, y in np.asarray(coords).reshape(-1, 2)]


def read_patch(slide: openslide.OpenSlide, x: int, y: int, geometry: Geometry) -> Image.Image:
    """RGB patch of ``patch_size`` pixels at the target mpp; areas outside the scan are white, not black."""
    size = geometry.read_size
    region = slide.read_region((int(x), int(y)), geometry.patch_level, (size, size))
    patch = Image.new("RGB", region.size, (255, 255, 255))
    patch.paste(region, mask=region.getchannel("A"))
    if size != geometry.patch_size:
        patch = patch.resize((geometry.patch_size, geometry.patch_size), Image.Resampling.BILINEAR)
    return patch


class PatchDataset(Dataset):
    """Patches from one or many slides, each transformed; yields ``(transform(image), index)``."""

    def __init__(self, items: Sequence[PatchItem], transform: Callable[[Image.Image], Any] | None = None,
                 max_open_slides: int = 8):
        self.items = items
        self.transform = transform
        self.max_open_slides = max_open_slides
        self._handles: OrderedDict[str, openslide.OpenSlide] = OrderedDict()
        self._owner_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item = self.items[index]
        slide = self._slide(item.slide_path)
        try:
            image = read_patch(slide, item.x, item.y, item.geometry)
        except openslide.OpenSlideError as error:
            raise InputError(
                f"{item.slide_path}: reading pixels failed at ({item.x}, {item.y}) ({error}); the file is damaged: "
                "re-export it or pass --skip_errors"
            ) from None
        return (self.transform(image) if self.transform else image), index

    def _slide(self, path: str) -> openslide.OpenSlide:
        if self._owner_pid != os.getpid():  # a forked worker must not reuse its parent's handles
            self._handles = OrderedDict()
            self._owner_pid = os.getpid()
        if path in self._handles:
            self._handles.move_to_end(path)
            return self._handles[path]
        handle = open_slide(path)
        self._handles[path] = handle
        if len(self._handles) > self.max_open_slides:
            self._handles.popitem(last=False)[1].close()
        return handle
