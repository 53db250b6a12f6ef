"""``mil qupath``: patch scores and the mined selection as GeoJSON that QuPath imports onto the slide.

    mil qupath --run RUN --features STORE/features/TAG [--selection ROUND/selection.csv] --out DIR

Per slide, ``<slide_id>_tiles.geojson`` holds every scored patch as a QuPath *tile* object with measurements
("tumor score" = sigmoid of the tumor logit, "tumor logit", and "attention" when the model has it), so
*Measure > Show measurement maps* colours the whole slide by the model; ``<slide_id>_selection.geojson`` holds
what mining selected as *detections* classified "Pseudo-positive", "Hard negative" or "Negative", for a
pathologist to review. Geometry is in level-0 pixels, as QuPath expects (File > Import objects, or drag the file
onto the open slide). ``top_k_geojson`` (``mil heatmap --geojson_top_k``) lives here too.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jsonargparse import ActionConfigFile, ArgumentParser
from scipy.special import expit
from tqdm import tqdm

from features.errors import InputError
from features.store import atomic_path, find_feature_files

# kind in the selection file -> (QuPath class name, RGB colour)
SELECTION_CLASSES = {"positive": ("Pseudo-positive", [220, 20, 60]), "hard_negative": ("Hard negative", [255, 140, 0]),
                     "negative": ("Negative", [30, 144, 255])}
TILE_NAMESPACE = uuid.UUID("6f1c4c1e-7f38-4a57-9a4e-6d4b1b0f0a11")  # stable object ids across reruns


def square(x: int, y: int, size: int) -> dict[str, Any]:
    """A closed square ring from the top-left corner (level-0 pixels): QuPath's Polygon geometry."""
    x, y = int(x), int(y)
    ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
    return {"type": "Polygon", "coordinates": [ring]}


def qupath_object(slide_id: str, x: int, y: int, size: int, object_type: str, measurements: dict[str, float],
                  classification: tuple[str, list[int]] | None = None, name: str | None = None) -> dict[str, Any]:
    """One GeoJSON Feature as QuPath writes and reads it (objectType, optional classification, measurements)."""
    properties: dict[str, Any] = {"objectType": object_type, "isLocked": object_type == "tile",
                                  "measurements": {k: float(v) for k, v in measurements.items()}}
    if classification is not None:
        properties["classification"] = {"name": classification[0], "color": list(classification[1])}
    if name is not None:
        properties["name"] = name
    return {"type": "Feature", "id": str(uuid.uuid5(TILE_NAMESPACE, f"{slide_id}:{object_type}:{x}:{y}")),
            "geometry": square(x, y, size), "properties": properties}


def collection(features: list[dict[str, Any]], slide_id: str) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features, "properties": {"slide_id": slide_id}}


def tiles_geojson(coords: np.ndarray, logits: np.ndarray, size_level0: int, slide_id: str,
                  attention: np.ndarray | None = None) -> dict[str, Any]:
    """Every scored patch as a QuPath tile with its tumor score: a full heatmap to colour by measurement."""
    probabilities = expit(np.asarray(logits, dtype=np.float64))
    features = []
    for i, (x, y) in enumerate(np.asarray(coords).reshape(-1, 2)):
        measurements = {"tumor score": probabilities[i], "tumor logit": float(logits[i])}
        if attention is not None:
            measurements["attention"] = float(attention[i])
        features.append(qupath_object(slide_id, x, y, size_level0, "tile", measurements))
    return collection(features, slide_id)


def selection_geojson(selection: pd.DataFrame, size_level0: int, slide_id: str) -> dict[str, Any]:
    """One slide's mined patches as detections classified by kind, with the score that selected them."""
    features = [qupath_object(slide_id, row.x, row.y, size_level0, "detection",
                              {"score": row.score, "pseudo_label": row.pseudo_label}, SELECTION_CLASSES[row.kind])
                for row in selection.itertuples(index=False)]
    return collection(features, slide_id)


def top_k_geojson(coords: np.ndarray, values: np.ndarray, size_level0: int, k: int, slide_id: str,
                  score: str) -> dict[str, Any]:
    """The ``k`` highest-scored patches as QuPath detection objects (square polygons, level-0 pixels)."""
    order = np.argsort(-np.asarray(values), kind="stable")[:k]
    features = []
    for rank, i in enumerate(order, start=1):
        x, y = int(coords[i, 0]), int(coords[i, 1])
        features.append({
            "type": "Feature",
            "geometry": square(x, y, size_level0),
            "properties": {"objectType": "detection", "name": f"top {rank}",
                           "classification": {"name": f"top-{k} {score}", "color": [255, 0, 255]},
                           "measurements": {score: float(values[i]), "rank": rank}},
        })
    return {"type": "FeatureCollection", "features": features, "properties": {"slide_id": slide_id}}


def write_geojson(path: Path, content: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mil qupath", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--run", type=str | None, default=None, help="run directory (uses its patch_scores/)")
    parser.add_argument("--scores", type=str | None, default=None, help="folder of patch score files")
    parser.add_argument("--features", type=str, required=True,
                        help="features folder (ours, CLAM or TRIDENT): the patch size in level-0 pixels")
    parser.add_argument("--patch_size_level0", type=int | None, default=None,
                        help="patch side in level-0 pixels, for feature files without geometry (CLAM)")
    parser.add_argument("--selection", type=str | None, default=None,
                        help="selection CSV from `mil mine` / `mil hnm`: also export it as classified detections")
    parser.add_argument("--out", type=str, required=True, help="output folder for the GeoJSON files")
    parser.add_argument("--slide_ids", type=list[str] | None, default=None, help="only these slides")
    parser.add_argument("--overwrite", type=bool, default=False, help="redo slides whose files exist")
    return parser


def main(argv: list[str] | None = None) -> None:
    from features.layouts import level0_patch_size
    from features.selection import read_selection
    from mil.patch_scores import find_patch_scores, read_patch_scores

    args = build_parser().parse_args(argv)
    if bool(args.run) == bool(args.scores):
        raise InputError("mil qupath: pass exactly one of --run DIR or --scores DIR")
    score_files = find_patch_scores(args.run or args.scores)
    feature_files = find_feature_files(args.features)
    selection = read_selection(args.selection) if args.selection else None
    wanted = sorted(score_files) if args.slide_ids is None else list(args.slide_ids)
    unknown = [s for s in wanted if s not in score_files]
    if unknown:
        raise InputError(f"--slide_ids {unknown[:5]}: no patch scores for them in {args.run or args.scores}")
    if selection is not None:
        stray = sorted(set(selection["slide_id"]) - set(feature_files))
        if stray:
            raise InputError(f"{args.selection}: slide {stray[0]!r} has no features file in {args.features}; "
                             "pass the store mining used")
    out = Path(args.out)
    written = skipped = 0
    for slide_id in tqdm(wanted, desc="qupath", unit="slide"):
        tiles, picked = out / f"{slide_id}_tiles.geojson", out / f"{slide_id}_selection.geojson"
        if tiles.is_file() and (selection is None or picked.is_file()) and not args.overwrite:
            skipped += 1
            continue
        if slide_id not in feature_files:
            raise InputError(f"{args.features}: no features file for slide {slide_id}; pass the run's features folder")
        size = level0_patch_size(feature_files[slide_id], args.patch_size_level0)
        coords, logits = read_patch_scores(score_files[slide_id], "instance")
        try:
            attention = read_patch_scores(score_files[slide_id], "attention")[1]
        except InputError:
            attention = None  # models without attention write instance scores only
        write_geojson(tiles, tiles_geojson(coords, logits, size, slide_id, attention))
        if selection is not None:
            rows = selection[selection["slide_id"] == slide_id]
            write_geojson(picked, selection_geojson(rows, size, slide_id))
        written += 1
    print(f"qupath: {written} slide(s) written, {skipped} already done, in {out}")
