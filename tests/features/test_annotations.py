"""Annotations from real files: ASAP XML (ours and Camelyon16-style), QuPath GeoJSON, COCO points."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import box
from shapely.ops import unary_union

from features.annotations import (
    find_annotation, patch_categories, patch_labels, patch_overlap, read_points, read_polygons,
)
from features.errors import InputError
from features.synth.asap import write_asap
from features.synth.layout import blob_polygon

CAMELYON_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="0" Y="0" />
        <Coordinate Order="2" X="100" Y="100" />
        <Coordinate Order="1" X="100" Y="0" />
        <Coordinate Order="3" X="0" Y="100" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Spline" PartOfGroup="_1" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="200" Y="0" /><Coordinate Order="1" X="300" Y="0" />
        <Coordinate Order="2" X="300" Y="100" /><Coordinate Order="3" X="200" Y="100" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="Polygon" PartOfGroup="_2" Color="#FF0000">
      <Coordinates>
        <Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="50" Y="0" />
        <Coordinate Order="2" X="50" Y="100" /><Coordinate Order="3" X="0" Y="100" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Dot" Type="Dot" PartOfGroup="_0"><Coordinates>
        <Coordinate Order="0" X="5" Y="5" /></Coordinates></Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#FF0000"><Attributes /></Group></AnnotationGroups>
</ASAP_Annotations>
"""


def test_synth_xml_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tumor = [blob_polygon(rng, 500, 400, 120), blob_polygon(rng, 1500, 900, 60)]
    look = [blob_polygon(rng, 900, 300, 80)]
    path = write_asap(tmp_path / "slide_000.xml", {"Tumor": tumor, "Lookalike": look})
    groups = read_polygons(path)
    assert set(groups) == {"tumor", "lookalike"}
    assert len(groups["tumor"]) == 2 and len(groups["lookalike"]) == 1
    for original, read in zip(tumor, groups["tumor"]):
        assert read.symmetric_difference(original).area < 1e-3 * original.area  # 2-decimal coordinates
    assert find_annotation(tmp_path, "slide_000") == path
    assert find_annotation(tmp_path, "slide_999") is None
    assert find_annotation(None, "slide_000") is None


def test_camelyon_groups_map_to_tumor_and_exclusion(tmp_path):
    path = tmp_path / "tumor_001.xml"
    path.write_text(CAMELYON_XML)
    groups = read_polygons(path)
    assert set(groups) == {"tumor", "exclusion"}
    assert len(groups["tumor"]) == 2  # the Dot has no area and is skipped
    assert groups["tumor"][0].area == pytest.approx(100 * 100)  # coordinates sorted by Order: a square
    # Exclusion (_2) is cut out of tumor: the left half of the first square is not tumor.
    coords = np.array([[0, 0], [50, 0], [200, 0]])
    assert patch_labels(groups, coords, 50).tolist() == [0, 1, 1]


def test_geojson_from_qupath(tmp_path):
    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature",
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [[[20, 0], [30, 0], [30, 10], [20, 10], [20, 0]]], [[[40, 0], [50, 0], [50, 10], [40, 10], [40, 0]]]]},
         "properties": {"classification": {"name": "Stroma"}}},
        # A bow-tie (self-intersecting) ring must be repaired, not dropped.
        {"type": "Feature",
         "geometry": {"type": "Polygon", "coordinates": [[[0, 20], [10, 30], [10, 20], [0, 30], [0, 20]]]},
         "properties": {"classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
    ]}
    path = tmp_path / "case.geojson"
    path.write_text(json.dumps(collection))
    groups = read_polygons(path)
    assert set(groups) == {"tumor", "stroma"}
    assert len(groups["stroma"]) == 2
    assert all(p.is_valid for p in groups["tumor"])
    assert sum(p.area for p in groups["tumor"]) == pytest.approx(100 + 50)  # square + two repaired triangles
    assert find_annotation(tmp_path, "case") == path


def test_look_alike_spellings_all_reach_the_lookalike_group(tmp_path):
    """However an annotator spells look-alikes, they count as look-alikes, never as normal tissue."""
    spellings = ["Look-alike", "look_alike", "Look alike", "LOOKALIKES", "Mimic"]
    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": name}},
         "geometry": {"type": "Polygon", "coordinates": [[[x, 0], [x + 100, 0], [x + 100, 100], [x, 100], [x, 0]]]}}
        for x, name in zip(range(0, 1000, 200), spellings)]}
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(collection))
    groups = read_polygons(path)
    assert set(groups) == {"lookalike"} and len(groups["lookalike"]) == len(spellings)
    coords = np.array([[x, 0] for x in range(0, 1000, 200)] + [[1100, 0]])
    assert patch_categories(groups, coords, 100).tolist() == ["lookalike"] * len(spellings) + ["normal"]


def test_patch_overlap_by_hand():
    square = [box(0, 0, 100, 100)]
    coords = np.array([[0, 0], [50, 50], [75, 0], [100, 100], [-50, -50], [500, 500]], dtype=np.int64)
    overlap = patch_overlap(square, coords, 50)
    assert overlap.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    overlap = patch_overlap(square, coords, 100)  # [50,50] with side 100: a quarter is inside
    assert overlap.tolist() == pytest.approx([1.0, 0.25, 0.25, 0.0, 0.25, 0.0])
    assert patch_overlap([], coords, 50).tolist() == [0.0] * 6
    groups = {"tumor": square, "exclusion": [box(0, 0, 25, 50)], "lookalike": [box(0, 0, 500, 500)]}
    assert patch_overlap(groups, coords, 50).tolist() == pytest.approx([0.5, 1.0, 0.5, 0.0, 0.0, 0.0])


def test_categories_tumor_lookalike_normal():
    groups = {"tumor": [box(0, 0, 100, 100)], "lookalike": [box(200, 0, 300, 100)]}
    coords = np.array([[0, 0], [200, 0], [400, 0], [60, 0]])
    assert patch_categories(groups, coords, 50).tolist() == ["tumor", "lookalike", "normal", "tumor"]
    assert patch_categories(groups, coords, 50, threshold=1.0).tolist() == ["tumor", "lookalike", "normal", "normal"]


def test_patch_overlap_on_50k_patches_adds_up_to_the_polygon_area():
    rng = np.random.default_rng(1)
    polygons = [blob_polygon(rng, x, y, 600) for x, y in rng.uniform(1000, 40000, size=(20, 2))]
    grid = np.stack(np.meshgrid(np.arange(0, 224 * 224, 224), np.arange(0, 224 * 224, 224)), -1).reshape(-1, 2)
    overlap = patch_overlap(polygons, grid, 224)  # speed belongs to benchmarks, not to a timed test
    assert len(grid) == 50176 and 0 < (overlap > 0).sum() < len(grid)
    # The covered patch area adds up to the polygons' area (the grid tiles the plane without gaps).
    covered = overlap.sum() * 224 * 224
    assert covered == pytest.approx(unary_union(polygons).area, rel=1e-6)


def test_malformed_xml_names_the_file(tmp_path):
    broken = tmp_path / "broken.xml"
    broken.write_text("<ASAP_Annotations><Annotations><Annotation>")
    with pytest.raises(InputError, match="broken.xml"):
        read_polygons(broken)
    other = tmp_path / "other.xml"
    other.write_text("<svg></svg>")
    with pytest.raises(InputError, match="ASAP_Annotations"):
        read_polygons(other)
    bad_number = tmp_path / "bad.xml"
    bad_number.write_text(CAMELYON_XML.replace('X="100" Y="0"', 'X="abc" Y="0"'))
    with pytest.raises(InputError, match="bad.xml"):
        read_polygons(bad_number)
    with pytest.raises(InputError, match="not found"):
        read_polygons(tmp_path / "missing.xml")


def test_coco_points(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "a.tiff", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "not mitotic figure"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 20, 60, 70]},
                        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 50, 50]}],
    }
    path = tmp_path / "midog.json"
    path.write_text(json.dumps(coco))
    points = read_points(path)
    assert points[["x", "y", "label"]].values.tolist() == [[35.0, 45.0, 1], [25.0, 25.0, 0]]
    assert points["file_name"].tolist() == ["a.tiff", "a.tiff"]
    assert read_points(path, bbox_format="xywh")[["x", "y"]].values.tolist()[0] == [40.0, 55.0]
    coco["categories"] = [{"id": 1, "name": "cell"}]
    path.write_text(json.dumps(coco))
    with pytest.raises(InputError, match="mitotic figure"):
        read_points(path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(InputError, match="midog.json"):
        read_points(path)
