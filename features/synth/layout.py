"""Where things go on a synthetic slide: tissue blobs, tumor regions and look-alike regions.

Tissue is a raster mask (it is never annotated); tumor and look-alike regions are polygons in level-0 pixels,
because they are written as annotations and must match the pixels exactly. Regions are placed where the tissue
is thick enough to hold them whole, so every annotated polygon lies inside tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from PIL import Image, ImageDraw
from scipy import ndimage
from shapely.geometry import Polygon

from features.synth.texture import smooth_field

COARSE = 16  # tissue is drawn on a grid this many times coarser than level 0, then upsampled

# Values of the region map returned by :func:`region_map`.
BACKGROUND, NORMAL, TUMOR, LOOKALIKE = 0, 1, 2, 3


@dataclass
class Layout:
    """One slide's geometry at level 0."""

    tissue: np.ndarray  # (H, W) float32 in [0, 1], soft-edged tissue opacity
    tumor: list[Polygon]
    lookalike: list[Polygon]

    @property
    def tissue_area(self) -> float:
        return float((self.tissue > 0.5).sum())


def tissue_field(rng: np.random.Generator, shape: tuple[int, int], coverage: float, n_blobs: int) -> np.ndarray:
    """Soft tissue opacity (H, W): ``n_blobs`` smooth irregular blobs covering about ``coverage`` of the slide."""
    height, width = shape
    small = (max(8, height // COARSE), max(8, width // COARSE))
    gy, gx = np.mgrid[0:small[0], 0:small[1]].astype(np.float32)
    gy, gx = gy / small[0], gx / small[1]
    distance = np.full(small, np.inf, dtype=np.float32)
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
        rx, ry = rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.4)
        angle = rng.uniform(0, np.pi)
        u = ((gx - cx) * np.cos(angle) + (gy - cy) * np.sin(angle)) / rx
        v = (-(gx - cx) * np.sin(angle) + (gy - cy) * np.cos(angle)) / ry
        distance = np.minimum(distance, np.sqrt(u * u + v * v))
    distance += 0.35 * smooth_field(rng, small, scale_px=min(small) / 5)
    edge = np.minimum(np.minimum(gx, 1 - gx), np.minimum(gy, 1 - gy))
    distance += np.clip(0.06 - edge, 0, None) * 60  # keep tissue off the slide border
    threshold = np.quantile(distance, coverage)
    soft = np.clip((threshold - distance) / 0.04 + 0.5, 0, 1)
    full = ndimage.zoom(soft, (height / small[0], width / small[1]), order=1, prefilter=False)
    return _fit(full, shape)


def _fit(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop or edge-pad ``array`` to exactly ``shape`` (zoom may be off by a pixel)."""
    array = array[:shape[0], :shape[1]]
    pad = ((0, shape[0] - array.shape[0]), (0, shape[1] - array.shape[1]))
    return np.pad(array, pad, mode="edge").astype(np.float32)


def blob_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, wobble: float = 0.25,
                 n_vertices: int = 40) -> Polygon:
    """A smooth star-shaped polygon of mean radius ``radius``; always valid, never wider than 1 + wobble."""
    angles = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    amplitudes = rng.uniform(-1, 1, size=4) * wobble / np.array([1.0, 1.6, 2.4, 3.2]) / 2.2
    phases = rng.uniform(0, 2 * np.pi, size=4)
    r = radius * (1 + sum(amp * np.sin((k + 2) * angles + ph) for k, (amp, ph) in enumerate(zip(amplitudes, phases))))
    return Polygon(np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1))


def place_regions(rng: np.random.Generator, tissue: np.ndarray, areas: list[float], avoid: list[Polygon],
                  wobble: float = 0.25) -> list[Polygon]:
    """Polygons of the given pixel ``areas`` inside tissue, apart from each other and from ``avoid``."""
    thick = ndimage.distance_transform_edt(tissue[::COARSE, ::COARSE] > 0.5) * COARSE
    placed: list[Polygon] = []
    for area in sorted(areas, reverse=True):
        radius = float(np.sqrt(area / np.pi))
        for _attempt in range(6):
            polygon = _try_place(rng, thick, radius, wobble, avoid + placed)
            if polygon is not None:
                placed.append(polygon)
                break
            radius *= 0.8  # not enough room: a smaller region beats none
    return placed


def _try_place(rng: np.random.Generator, thick: np.ndarray, radius: float, wobble: float,
               others: list[Polygon]) -> Polygon | None:
    reach = radius * (1 + wobble) + 2 * COARSE
    rows, cols = np.nonzero(thick > reach)
    if len(rows) == 0:
        return None
    blocked = shapely.union_all([p.buffer(radius * 0.3 + COARSE) for p in others]) if others else None
    for index in rng.permutation(len(rows))[:40]:
        cy = (rows[index] + rng.uniform(0, 1)) * COARSE
        cx = (cols[index] + rng.uniform(0, 1)) * COARSE
        polygon = blob_polygon(rng, cx, cy, radius, wobble)
        if blocked is None or not polygon.intersects(blocked):
            return polygon
    return None


def region_map(shape: tuple[int, int], layout: Layout) -> np.ndarray:
    """(H, W) uint8: BACKGROUND, NORMAL tissue, TUMOR or LOOKALIKE, rasterised from the same polygons."""
    canvas = Image.fromarray(np.where(layout.tissue > 0.5, NORMAL, BACKGROUND).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for value, polygons in ((TUMOR, layout.tumor), (LOOKALIKE, layout.lookalike)):
        for polygon in polygons:
            draw.polygon([tuple(p) for p in np.asarray(polygon.exterior.coords)[:-1]], fill=value)
    return np.asarray(canvas)


def split_area(rng: np.random.Generator, total: float, n_regions: int) -> list[float]:
    """Split ``total`` pixels into ``n_regions`` unequal areas."""
    weights = rng.dirichlet(np.full(n_regions, 2.0))
    return [float(total * w) for w in weights]
