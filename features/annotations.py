"""Region and point annotations, and the patch-level truth they imply.

Polygons come from ASAP XML (Camelyon16) or GeoJSON (QuPath), always in level-0 pixels, grouped by a lower-cased
class name. Camelyon16 names its groups ``_0``/``_1`` (tumor) and ``_2`` (exclusion, i.e. holes in tumor), so
those are renamed to ``tumor`` and ``exclusion``; tumor truth is always tumor minus exclusion. Points come from a
MIDOG++-style COCO file.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from features.errors import InputError

TUMOR, LOOKALIKE, EXCLUSION, NORMAL = "tumor", "lookalike", "exclusion", "normal"
GROUP_ALIASES = {"_0": TUMOR, "_1": TUMOR, "_2": EXCLUSION, "metastases": TUMOR, "metastasis": TUMOR, "tumour": TUMOR,
                 "lookalikes": LOOKALIKE, "mimic": LOOKALIKE, "mimics": LOOKALIKE}
MITOTIC, NOT_MITOTIC = "mitotic figure", "not mitotic figure"
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")


def group_name(name: str | None) -> str:
    """Lower-cased group name with Camelyon16's numbered groups mapped to tumor / exclusion.

    Annotators spell look-alikes many ways (``Look-alike``, ``look_alike``, ``Look alike``, ``Mimic``); all of them
    must reach the one ``lookalike`` group, or tumor vs look-alike AUC and the selection's composition would
    silently read every look-alike as normal tissue.
    """
    key = (name or "unclassified").strip().lower()
    if key in GROUP_ALIASES:
        return GROUP_ALIASES[key]
    compact = re.sub(r"[\s_-]+", "", key)
    return GROUP_ALIASES.get(compact, compact if compact == LOOKALIKE else key)


def read_polygons(path: str | Path) -> dict[str, list[Polygon]]:
    """Polygons per group from an ASAP XML or GeoJSON file; invalid rings are repaired, not dropped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: annotation file not found; check the annotations folder")
    if path.suffix.lower() == ".xml":
        raw = _read_asap(path)
    elif path.suffix.lower() in {".geojson", ".json"}:
        raw = _read_geojson(path)
    else:
        raise InputError(f"{path}: unknown annotation format; use ASAP .xml or QuPath .geojson")
    groups: dict[str, list[Polygon]] = defaultdict(list)
    for name, geometry in raw:
        groups[group_name(name)].extend(_polygons(geometry))
    return dict(groups)


def _read_asap(path: Path) -> list[tuple[str, BaseGeometry]]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise InputError(f"{path}: not valid XML ({error}); re-export the annotations from ASAP")
    if root.tag != "ASAP_Annotations":
        raise InputError(f"{path}: root element is <{root.tag}>, not <ASAP_Annotations>; is this an ASAP file?")
    found = []
    for annotation in root.iter("Annotation"):
        points = []
        for node in annotation.iter("Coordinate"):
            try:
                points.append((float(node.get("Order", len(points))), float(node.get("X")), float(node.get("Y"))))
            except (TypeError, ValueError):
                raise InputError(f"{path}: annotation {annotation.get('Name')!r} has a coordinate without numeric "
                                 "X/Y; fix or remove it")
        if len(points) < 3:  # dots and lines carry no area
            continue
        points.sort()
        found.append((annotation.get("PartOfGroup"), Polygon([(x, y) for _, x, y in points])))
    return found


def _read_geojson(path: Path) -> list[tuple[str, BaseGeometry]]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error}); export the annotations from QuPath as GeoJSON")
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):  # QuPath's "export as array"
        features = data
    else:
        raise InputError(f"{path}: expected a GeoJSON FeatureCollection, Feature or list of Features")
    found = []
    for index, feature in enumerate(features):
        geometry = (feature or {}).get("geometry") if isinstance(feature, dict) else None
        if not geometry or geometry.get("type") not in {"Polygon", "MultiPolygon"}:
            continue
        try:
            found.append((_classification(feature.get("properties") or {}), shape(geometry)))
        except (ValueError, TypeError, AttributeError, IndexError) as error:
            raise InputError(f"{path}: feature {index} has a malformed {geometry.get('type')} ({error})")
    return found


def _classification(properties: dict) -> str | None:
    value = properties.get("classification")
    if isinstance(value, dict):
        return value.get("name")
    if isinstance(value, str):
        return value
    return properties.get("name")


def _polygons(geometry: BaseGeometry) -> list[Polygon]:
    """Valid polygons with area from any (possibly self-intersecting) geometry."""
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
        if not isinstance(geometry, (Polygon, MultiPolygon)):
            geometry = shapely.union_all([g for g in getattr(geometry, "geoms", [geometry])
                                          if isinstance(g, (Polygon, MultiPolygon))] or [Polygon()])
    parts = list(geometry.geoms) if isinstance(geometry, MultiPolygon) else [geometry]
    return [p for p in parts if isinstance(p, Polygon) and p.area > 0]


def find_annotation(folder: str | Path | None, slide_id: str) -> Path | None:
    """``<slide_id>.xml``, ``.geojson`` or ``.json`` in ``folder`` (first found), else None."""
    if folder is None:
        return None
    for suffix in ANNOTATION_SUFFIXES:
        candidate = Path(folder) / f"{slide_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def group_geometry(polygons: dict[str, list[Polygon]], group: str) -> BaseGeometry:
    """Union of one group; tumor has the exclusion group cut out of it."""
    geometry = shapely.union_all(polygons.get(group, [])) if polygons.get(group) else Polygon()
    if group == TUMOR and polygons.get(EXCLUSION):
        geometry = geometry.difference(shapely.union_all(polygons[EXCLUSION]))
    return geometry


def patch_overlap(polygons: list[Polygon] | BaseGeometry | dict[str, list[Polygon]], coords: np.ndarray,
                  patch_size_level0: float) -> np.ndarray:
    """Fraction (N,) of each square patch (top-left ``coords``, side ``patch_size_level0``) covered by the polygons.

    ``polygons`` is a list, one geometry, or what :func:`read_polygons` returns (then: tumor minus exclusion).
    Patches wholly inside or wholly outside cost one vectorised predicate; only boundary patches are intersected.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    overlap = np.zeros(len(coords), dtype=np.float64)
    if isinstance(polygons, dict):
        polygons = group_geometry(polygons, TUMOR)
    geometry = polygons if isinstance(polygons, BaseGeometry) else (
        shapely.union_all(list(polygons)) if len(polygons) else Polygon())
    if len(coords) == 0 or geometry.is_empty:
        return overlap
    size = float(patch_size_level0)
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size, coords[:, 1] + size)
    shapely.prepare(geometry)
    touching = shapely.intersects(geometry, boxes)
    inside = touching & shapely.contains_properly(geometry, boxes)
    overlap[inside] = 1.0
    boundary = np.flatnonzero(touching & ~inside)
    if len(boundary):
        overlap[boundary] = shapely.area(shapely.intersection(boxes[boundary], geometry)) / (size * size)
    return np.clip(overlap, 0.0, 1.0)


def patch_labels(polygons: dict[str, list[Polygon]], coords: np.ndarray, patch_size_level0: float,
                 threshold: float = 0.5, group: str = TUMOR) -> np.ndarray:
    """(N,) int64: 1 where at least ``threshold`` of the patch lies in ``group`` (tumor minus exclusion)."""
    overlap = patch_overlap(group_geometry(polygons, group), coords, patch_size_level0)
    return (overlap >= threshold).astype(np.int64)


def patch_categories(polygons: dict[str, list[Polygon]], coords: np.ndarray, patch_size_level0: float,
                     threshold: float = 0.5) -> np.ndarray:
    """(N,) str: ``tumor``, else ``lookalike``, else ``normal``; what mining is scored against."""
    categories = np.full(len(np.asarray(coords).reshape(-1, 2)), NORMAL, dtype=object)
    look = patch_overlap(group_geometry(polygons, LOOKALIKE), coords, patch_size_level0) >= threshold
    categories[look] = LOOKALIKE
    categories[patch_labels(polygons, coords, patch_size_level0, threshold) == 1] = TUMOR
    return categories


def read_points(coco_json: str | Path, bbox_format: str = "xyxy") -> pd.DataFrame:
    """One row per box: file_name, image_id, x, y (box centre), label (1 mitotic, 0 imposter), category.

    MIDOG++ writes boxes as [x1, y1, x2, y2] (``xyxy``); standard COCO uses [x, y, w, h] (``xywh``).
    """
    path = Path(coco_json)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: COCO file not found")
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})")
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise InputError(f"{path}: a COCO file needs 'images', 'annotations' and 'categories'")
    names = {c.get("id"): str(c.get("name", "")).strip().lower() for c in data["categories"]}
    if MITOTIC not in names.values():
        raise InputError(f"{path}: no category named {MITOTIC!r} (found {sorted(names.values())}); "
                         "rename the mitosis category")
    files = {image.get("id"): image.get("file_name") for image in data["images"]}
    rows = []
    for annotation in data["annotations"]:
        try:
            x1, y1, a, b = (float(v) for v in annotation["bbox"])
            category = names[annotation["category_id"]]
            file_name = files[annotation["image_id"]]
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"{path}: annotation {annotation.get('id')} is malformed or points to an unknown "
                             f"image/category ({error!r})")
        x2, y2 = (a, b) if bbox_format == "xyxy" else (x1 + a, y1 + b)
        rows.append({"file_name": file_name, "image_id": annotation["image_id"], "x": (x1 + x2) / 2,
                     "y": (y1 + y2) / 2, "label": int(category == MITOTIC), "category": category})
    return pd.DataFrame(rows, columns=["file_name", "image_id", "x", "y", "label", "category"])
