"""What is drawn over a slide: the patch-score heatmap, annotation outlines, top-k and mined patches, downloads.

The heatmap is one small RGBA image per (slide, source, scale, threshold), a few pixels per patch, that the page
lays over the whole slide; OpenSeadragon stretches it with smoothing off, so patches stay crisp squares. It is
painted with the same functions as ``mil heatmap`` (``paint``, the sigmoid scale, the turbo colour map), so the
browser and the PNGs agree. Two colour scales: ``probability`` (sigmoid of the tumor logit, comparable across
slides) and ``rank`` (the patch's rank within the slide, 0 lowest to 1 highest: where on this slide the model
looks). The threshold hides patches whose displayed value is below it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy.stats import rankdata

from mil.evaluation.heatmap import COLOURMAP, absolute_values, paint, render, title_of
from mil.evaluation.qupath import tiles_geojson, top_k_geojson
from mil.viewer.catalog import KINDS, Catalog

SCALES = ("probability", "rank")
CELL_PIXELS = 4  # overlay pixels per patch side
MAX_SIDE = 4096


def displayed_values(values: np.ndarray, scale: str) -> np.ndarray:
    """Patch values on [0, 1]: sigmoid of the logit, or the per-slide rank (ties share their mean rank)."""
    if scale == "probability":
        return absolute_values(values, "instance")
    if len(values) < 2:
        return np.ones(len(values))
    return (rankdata(values) - 1.0) / (len(values) - 1.0)


def heatmap_png(coords: np.ndarray, values: np.ndarray, size_level0: int, level0_size: tuple[int, int],
                scale: str, threshold: float) -> bytes:
    """The overlay as RGBA PNG covering the whole slide; transparent where no patch or below ``threshold``."""
    width, height = level0_size
    factor = min(CELL_PIXELS / size_level0, MAX_SIDE / max(width, height))
    shape = (max(1, int(round(height * factor))), max(1, int(round(width * factor))))
    grid = paint(displayed_values(values, scale), coords, size_level0, (shape[1] / width, shape[0] / height), shape)
    shown = ~np.isnan(grid) & (np.nan_to_num(grid, nan=-1.0) >= threshold)
    rgba = (colormaps[COLOURMAP](np.nan_to_num(grid, nan=0.0)) * 255.0).astype(np.uint8)
    rgba[..., 3] = np.where(shown, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def patch_rows(coords: np.ndarray, values: np.ndarray, order: np.ndarray) -> list[dict[str, Any]]:
    return [{"x": int(coords[i, 0]), "y": int(coords[i, 1]), "score": float(values[i]),
             "probability": float(absolute_values(values[i:i + 1], "instance")[0])} for i in order]


def top_k(coords: np.ndarray, values: np.ndarray, k: int) -> list[dict[str, Any]]:
    return patch_rows(coords, values, np.argsort(-values, kind="stable")[:k])


def mined(catalog: Catalog, slide_id: str) -> list[dict[str, Any]]:
    """Per round: the slide's mined positives and hard negatives (with their scores) and the round's quality."""
    rounds = []
    for round_ in catalog.rounds:
        table = catalog.selection(slide_id, round_)
        kinds = {}
        for kind in KINDS:
            rows = table[table["kind"] == kind] if len(table) else table
            rows = rows.sort_values("score", ascending=(kind != "positive")) if len(rows) else rows
            kinds[kind] = [{"x": int(r.x), "y": int(r.y), "score": float(r.score),
                            "truth": str(getattr(r, "truth", "") or "")} for r in rows.itertuples()]
        rounds.append({"round": round_.index, "source": round_.source.key, "has_scores": slide_id in round_.source.files,
                       "mined": kinds, "quality": _finite(round_.quality)})
    return rounds


def _finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, recursively."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def annotation_outlines(folder: Path | None, slide_id: str, tolerance: float = 0.0) -> dict[str, list[list[list[float]]]]:
    """Exterior rings per annotation group (tumor, lookalike, ...), level-0 pixels, for the page to outline."""
    if folder is None:
        return {}
    from features.annotations import find_annotation, read_polygons

    path = find_annotation(folder, slide_id)
    if path is None:
        return {}
    outlines: dict[str, list[list[list[float]]]] = {}
    for group, polygons in read_polygons(path).items():
        rings = []
        for polygon in polygons:
            ring = polygon.simplify(tolerance) if tolerance else polygon
            rings.append([[round(float(x), 1), round(float(y), 1)] for x, y in np.asarray(ring.exterior.coords)])
        outlines[group] = rings
    return outlines


def heatmap_download(catalog: Catalog, slide_id: str, key: str, thumbnail: Image.Image,
                     level0_size: tuple[int, int]) -> bytes:
    """The same figure that ``mil heatmap`` writes (titled, with colour bars), for one slide and source."""
    from features.annotations import find_annotation, read_polygons

    coords, values = catalog.scores(slide_id, key)
    annotation = find_annotation(catalog.annotations, slide_id) if catalog.annotations else None
    polygons = read_polygons(annotation) if annotation else {}
    slide = catalog.slides[slide_id]
    info = {"label": slide.label, "score": slide.score, "split": slide.split,
            "round": key[1:] if key.startswith("r") and key[1:].isdigit() else None}
    figure = render(thumbnail, level0_size, coords, values, catalog.patch_size_level0(slide_id), "instance", polygons,
                    title_of(slide_id, info))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def qupath_download(catalog: Catalog, slide_id: str, key: str, k: int) -> bytes:
    """The slide's top-k patches as QuPath detections (GeoJSON, level-0 pixels)."""
    coords, values = catalog.scores(slide_id, key)
    collection = top_k_geojson(coords, values, catalog.patch_size_level0(slide_id), k, slide_id, "instance")
    return json.dumps(collection, indent=1).encode()


def qupath_tiles_download(catalog: Catalog, slide_id: str, key: str) -> bytes:
    """Every scored patch as a QuPath tile with its tumor score (``mil qupath``'s format): colour by measurement."""
    coords, values = catalog.scores(slide_id, key)
    return json.dumps(tiles_geojson(coords, values, catalog.patch_size_level0(slide_id), slide_id)).encode()
