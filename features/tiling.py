"""Patch grids at a target resolution, in level-0 pixel coordinates.

A patch of ``patch_size`` pixels at ``target_mpp`` covers ``patch_size * target_mpp`` microns; on a slide scanned
at ``mpp_level0`` that is ``patch_size_level0 = round(patch_size * target_mpp / mpp_level0)`` level-0 pixels. It is
read from the coarsest pyramid level that is still at least as fine as the target (so pixels are only ever
averaged down, never invented), then resized to ``patch_size``. A 0.25 and a 0.5 mpp scan of the same tissue
therefore give patches with the same field of view.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import openslide

from features.errors import InputError
from features.slides import SlideRef, slide_mpp
from features.store import grid_step
from features.tissue import TissueConfig, TissueMask, detect_tissue

log = logging.getLogger(__name__)


@dataclass
class TilingConfig:
    """Where patches go: size at the target resolution, overlap (pixels at target mpp), minimum tissue."""

    target_mpp: float = 0.5
    """Microns per pixel the patches are read at (0.5 = 20x)."""
    patch_size: int = 224
    """Patch side in pixels at target_mpp."""
    overlap: int = 0
    """Pixels at target_mpp shared by neighbouring patches."""
    min_tissue: float = 0.25
    """Least fraction of a patch that must be tissue for it to be kept."""


@dataclass
class Geometry:
    """How a slide's patches map to its pixels: exactly the ``coords`` attributes of the feature store."""

    patch_size: int
    patch_size_level0: int
    patch_level: int
    downsample: float
    target_mpp: float
    mpp_level0: float
    mpp_source: str
    level0_width: int
    level0_height: int
    overlap: int

    @property
    def read_size(self) -> int:
        """Side of the square read at ``patch_level`` before resizing to ``patch_size``."""
        return max(1, round(self.patch_size_level0 / self.downsample))

    @property
    def stride_level0(self) -> int:
        return grid_step(self.to_attrs())

    def to_attrs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Geometry:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in attrs]
        if missing:
            raise InputError(f"coords attributes lack {missing}; re-tile with `features tile` to get full geometry")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        cast = {"int": int, "float": float, "str": str}
        return cls(**{n: cast[types[n]](attrs[n]) for n in names})


def plan_geometry(slide: openslide.OpenSlide, mpp_level0: float, mpp_source: str, config: TilingConfig) -> Geometry:
    """Patch geometry for one slide: level-0 patch size, the pyramid level to read from, its downsample."""
    if config.patch_size <= 0 or not 0 <= config.overlap < config.patch_size:
        raise InputError(f"patch_size {config.patch_size} / overlap {config.overlap}: need 0 <= overlap < patch_size")
    scale = config.target_mpp / mpp_level0
    if scale < 0.95:
        log.warning("target %.3f mpp is finer than the scan (%.3f mpp): patches are upsampled", config.target_mpp,
                    mpp_level0)
    level = slide.get_best_level_for_downsample(max(scale, 1.0) * 1.001)
    width, height = slide.dimensions
    return Geometry(
        patch_size=int(config.patch_size),
        patch_size_level0=max(1, round(config.patch_size * scale)),
        patch_level=int(level),
        downsample=float(slide.level_downsamples[level]),
        target_mpp=float(config.target_mpp),
        mpp_level0=float(mpp_level0),
        mpp_source=mpp_source,
        level0_width=int(width),
        level0_height=int(height),
        overlap=int(config.overlap),
    )


def grid_coords(geometry: Geometry, mask: TissueMask, min_tissue: float) -> np.ndarray:
    """Top-left level-0 corners of full patches whose tissue fraction is at least ``min_tissue``, row-major."""
    size, stride = geometry.patch_size_level0, geometry.stride_level0
    xs = np.arange(0, geometry.level0_width - size + 1, stride, dtype=np.int64)
    ys = np.arange(0, geometry.level0_height - size + 1, stride, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    keep = mask.fraction(coords, size) >= min_tissue
    return coords[keep]


def tile_slide(slide: openslide.OpenSlide, ref: SlideRef, tissue: TissueConfig | None = None,
               tiling: TilingConfig | None = None) -> tuple[np.ndarray, Geometry, TissueMask]:
    """Tissue mask, geometry and patch coordinates of one slide."""
    tiling = tiling or TilingConfig()
    mpp_level0, source = slide_mpp(slide, ref)
    geometry = plan_geometry(slide, mpp_level0, source, tiling)
    mask = detect_tissue(slide, mpp_level0, tissue)
    coords = grid_coords(geometry, mask, tiling.min_tissue)
    if len(coords) == 0:
        log.warning("%s: no tissue patches found (tissue covers %.1f%% of the mask); writing an empty bag",
                    ref.slide_id, 100 * mask.tissue_fraction)
    return coords, geometry, mask
