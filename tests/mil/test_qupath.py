"""`mil qupath`: every patch as a QuPath tile with its tumor score, the mined selection as classified detections."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from eval_inputs import write_patch_scores
from fixtures import write_bag
from shapely.geometry import shape

from features.selection import write_selection
from mil.__main__ import main as mil_main

PATCH = 64


@pytest.fixture
def run(tmp_path):
    xs, ys = np.meshgrid(np.arange(6) * PATCH + 128, np.arange(4) * PATCH + 64)
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    logits = np.linspace(-4.0, 4.0, len(coords))
    write_bag(tmp_path / "features" / "slide_a.h5", np.zeros((len(coords), 4)), coords, patch_size_level0=PATCH)
    write_bag(tmp_path / "features" / "slide_b.h5", np.zeros((len(coords), 4)), coords, patch_size_level0=PATCH)
    for slide_id in ("slide_a", "slide_b"):
        write_patch_scores(tmp_path / "run" / "patch_scores" / f"{slide_id}.h5", coords, logits,
                           attention=np.full(len(coords), 1.0 / len(coords)))
    kinds = ["positive", "positive", "hard_negative", "negative"]
    write_selection(tmp_path / "selection.csv", pd.DataFrame({
        "slide_id": ["slide_a"] * 4, "x": coords[[23, 22, 5, 0], 0], "y": coords[[23, 22, 5, 0], 1],
        "pseudo_label": [1, 1, 0, 0], "score": [0.98, 0.97, 0.3, 0.01], "kind": kinds}))
    return tmp_path, coords, logits


def test_tiles_and_selection_are_what_qupath_imports(run, capsys):
    root, coords, logits = run
    argv = ["qupath", "--run", str(root / "run"), "--features", str(root / "features"), "--selection",
            str(root / "selection.csv"), "--out", str(root / "qp")]
    assert mil_main(argv) == 0
    tiles = json.loads((root / "qp" / "slide_a_tiles.geojson").read_text())
    assert tiles["type"] == "FeatureCollection" and len(tiles["features"]) == len(coords)
    for feature, (x, y), logit in zip(tiles["features"], coords, logits):
        assert feature["type"] == "Feature" and feature["properties"]["objectType"] == "tile"
        polygon = shape(feature["geometry"])  # a valid square of one patch, in level-0 pixels
        assert polygon.is_valid and polygon.bounds == (x, y, x + PATCH, y + PATCH) and polygon.area == PATCH ** 2
        measurements = feature["properties"]["measurements"]
        assert measurements["tumor score"] == pytest.approx(1 / (1 + np.exp(-logit)))
        assert measurements["tumor logit"] == pytest.approx(logit) and "attention" in measurements
    assert len({f["id"] for f in tiles["features"]}) == len(coords)  # QuPath needs one id per object

    picked = json.loads((root / "qp" / "slide_a_selection.geojson").read_text())["features"]
    classes = [f["properties"]["classification"]["name"] for f in picked]
    assert classes == ["Pseudo-positive", "Pseudo-positive", "Hard negative", "Negative"]
    assert all(f["properties"]["objectType"] == "detection" for f in picked)
    assert shape(picked[0]["geometry"]).bounds == (*coords[23], *(coords[23] + PATCH))
    assert picked[2]["properties"]["measurements"] == {"score": 0.3, "pseudo_label": 0.0}
    assert json.loads((root / "qp" / "slide_b_selection.geojson").read_text())["features"] == []

    capsys.readouterr()
    assert mil_main(argv) == 0 and "0 slide(s) written, 2 already done" in capsys.readouterr().out


def test_qupath_needs_geometry_and_known_slides(run, tmp_path, capsys):
    root, coords, _ = run
    clam = tmp_path / "clam" / "h5_files"
    clam.mkdir(parents=True)
    import h5py

    for slide_id in ("slide_a", "slide_b"):
        with h5py.File(clam / f"{slide_id}.h5", "w") as h5:
            h5["features"], h5["coords"] = np.zeros((len(coords), 4), np.float32), coords
    base = ["qupath", "--run", str(root / "run"), "--features", str(tmp_path / "clam"), "--out", str(root / "q2")]
    assert mil_main(base) == 2 and "--patch_size_level0" in capsys.readouterr().err
    assert mil_main(base + ["--patch_size_level0", str(PATCH)]) == 0
    assert mil_main(base + ["--slide_ids", "[nope]"]) == 2 and "nope" in capsys.readouterr().err


def test_heatmap_keeps_its_top_k_export():
    from mil.evaluation.heatmap import top_k_geojson

    top = top_k_geojson(np.array([[0, 0], [64, 0]]), np.array([0.1, 0.9]), 64, 1, "s", "instance")
    assert top["features"][0]["geometry"]["coordinates"][0][0] == [64, 0]
