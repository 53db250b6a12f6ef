"""Heatmaps on a real tiny slide from stored coordinates and scores; QuPath GeoJSON of the top patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_inputs import asap_xml, write_patch_scores
from fixtures import write_bag, write_tiny_slide
from PIL import Image

from mil.__main__ import main as mil_main
from mil.evaluation.heatmap import absolute_values, panel_box, relative_values

PATCH = 64
TUMOR = (256, 192, 448, 384)  # level-0 box (x0, y0, x1, y1) inside the tissue block of the tiny slide


def tissue_grid() -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(256, 768, PATCH), np.arange(192, 576, PATCH))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def in_tumor(coords: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = TUMOR
    return (coords[:, 0] >= x0) & (coords[:, 0] + PATCH <= x1) & (coords[:, 1] >= y0) & (coords[:, 1] + PATCH <= y1)


@pytest.fixture
def cohort(tmp_path):
    slides = tmp_path / "slides"
    write_tiny_slide(slides / "slide_a.tiff", width=1024, height=768)
    coords = tissue_grid()
    rng = np.random.default_rng(0)
    write_bag(tmp_path / "features" / "slide_a.h5", rng.normal(size=(len(coords), 8)), coords, patch_size_level0=PATCH)
    logits = np.where(in_tumor(coords), 3.0, -3.0) + rng.normal(0, 0.2, len(coords))
    write_patch_scores(tmp_path / "run" / "patch_scores" / "slide_a.h5", coords, logits,
                       attention=np.full(len(coords), 1.0 / len(coords)))
    return tmp_path, coords, logits


def test_heatmap_png_is_hot_on_tumor(cohort, capsys):
    root, coords, logits = cohort
    argv = ["heatmap", "--run", str(root / "run"), "--slides", str(root / "slides"), "--features",
            str(root / "features"), "--out", str(root / "heat"), "--thumbnail_size", "512", "--geojson_top_k", "5"]
    assert mil_main(argv) == 0
    image = np.asarray(Image.open(root / "heat" / "slide_a_instance.png").convert("RGB"), dtype=float)
    thumb = (512, 384)  # 1024 x 768 slide, longest side 512
    x0, y0, x1, y1 = panel_box(1, thumb)
    assert image.shape[:2] == (y1, x1 + 10 + 14 + 40)
    for panel in (0, 1):
        px, py, _, _ = panel_box(panel, thumb)
        heat = image[..., 0] - image[..., 2]  # turbo: red when high, blue when low
        tumor = heat[py + 96 + 4:py + 192 - 4, px + 128 + 4:px + 224 - 4].mean()
        other = heat[py + 200:py + 288, px + 240:px + 384].mean()
        assert tumor > other + 80, (panel, tumor, other)

    detections = json.loads((root / "heat" / "slide_a_top5.geojson").read_text())["features"]
    assert len(detections) == 5
    for detection in detections:
        (x, y), *_ = detection["geometry"]["coordinates"][0]
        assert in_tumor(np.array([[x, y]]))[0]
        assert detection["properties"]["objectType"] == "detection"

    capsys.readouterr()
    assert mil_main(argv) == 0
    assert "0 written, 1 already done" in capsys.readouterr().out


def test_heatmap_attention_and_bad_input(cohort, capsys):
    root, _, _ = cohort
    base = ["heatmap", "--scores", str(root / "run" / "patch_scores"), "--slides", str(root / "slides"),
            "--features", str(root / "features"), "--out", str(root / "heat"), "--thumbnail_size", "256"]
    assert mil_main(base + ["--score", "attention"]) == 0
    assert Image.open(root / "heat" / "slide_a_attention.png").size[1] == 22 + 192
    assert mil_main(base + ["--slide_ids", "[missing]"]) == 2
    assert "missing" in capsys.readouterr().err


def test_value_scales():
    assert absolute_values(np.array([0.0, 100.0, -100.0]), "instance") == pytest.approx([0.5, 1.0, 0.0])
    uniform = np.full(4, 0.25)
    assert absolute_values(uniform, "attention") == pytest.approx([0.5] * 4)  # exactly the uniform share
    assert relative_values(np.array([2.0, 4.0, 3.0]), clip_percent=0) == pytest.approx([0.0, 1.0, 0.5])
    # One extreme patch among 200 no longer squeezes the rest into one colour.
    spread = np.r_[np.linspace(0.0, 1.0, 199), 1000.0]
    scaled = relative_values(spread)
    assert scaled[-1] == 1.0 and scaled[:199].max() - scaled[:199].min() > 0.9
    assert relative_values(np.array([1.0, 1.0])) == pytest.approx([0.5, 0.5])


def test_annotation_outlines_are_drawn(cohort):
    root, _, _ = cohort
    x0, y0, x1, y1 = TUMOR
    asap_xml(root / "ann" / "slide_a.xml", {"Tumor": [[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]]})
    assert mil_main(["heatmap", "--run", str(root / "run"), "--slides", str(root / "slides"), "--features",
                     str(root / "features"), "--annotations", str(root / "ann"), "--out", str(root / "heat"),
                     "--thumbnail_size", "512"]) == 0
    image = np.asarray(Image.open(root / "heat" / "slide_a_instance.png").convert("RGB")).astype(int)
    px, py, _, _ = panel_box(0, (512, 384))
    magenta = (image[..., 0] > 230) & (image[..., 1] < 30) & (image[..., 2] > 230)
    ys, xs = np.nonzero(magenta[py:py + 384, px:px + 512])
    assert len(xs) > 4 * 90  # four sides of a 96-pixel square, at least one pixel wide
    assert xs.min() >= 128 - 2 and xs.max() <= 224 + 2 and ys.min() >= 96 - 2 and ys.max() <= 192 + 2
