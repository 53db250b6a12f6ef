"""Pyramidal tiled JPEG TIFF that OpenSlide opens as a generic tiled TIFF, with its true resolution.

Each level is its own top-level page (reduced levels flagged with subfiletype 1) and carries resolution tags in
pixels per centimetre, so OpenSlide reports ``openslide.mpp-x`` = 1e4 / resolution for level 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from features.store import atomic_path

SMALLEST_SIDE = 512  # stop halving once the longer side of a level is at most this


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 box-filter downsample of an (H, W, 3) uint8 image (odd last row/column dropped)."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
    return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def pyramid(image: np.ndarray) -> list[np.ndarray]:
    """Level 0 and its halvings until the longer side is at most :data:`SMALLEST_SIDE` pixels."""
    levels = [image]
    while max(levels[-1].shape[:2]) > SMALLEST_SIDE and min(levels[-1].shape[:2]) >= 2:
        levels.append(halve(levels[-1]))
    return levels


def write_pyramidal_tiff(path: str | Path, image: np.ndarray, mpp: float, tile: int = 256,
                         quality: int = 90) -> Path:
    """Write ``image`` (H, W, 3 uint8) at level-0 ``mpp`` microns per pixel; atomic, deterministic bytes."""
    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 3_000_000_000) as tif:
        for index, level in enumerate(pyramid(image)):
            per_cm = 1e4 / (mpp * 2**index)
            tif.write(level, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                      photometric="rgb", subfiletype=1 if index else 0, resolution=(per_cm, per_cm),
                      resolutionunit="CENTIMETER", software=False, metadata=None)
    return path
