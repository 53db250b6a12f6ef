"""Heatmaps on a real tiny slide from stored coordinates and scores; QuPath GeoJSON of the top patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_inputs import asap_xml, write_patch_scores
from fixtures import write_bag, write_tiny_slide
from PIL import Image

from mil.__main__ import main as mil_main
from mil.evaluation.heatmap import RANK_LABEL, absolute_values, rank_values, relative_values, render

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
    run = tmp_path / "hnm" / "round_2" / "mil"
    write_patch_scores(run / "patch_scores" / "slide_a.h5", coords, logits,
                       attention=np.full(len(coords), 1.0 / len(coords)))
    (run / "predictions_test.csv").write_text("slide_id,label,score,split\nslide_a,1,0.8766,test\n")
    (tmp_path / "run").symlink_to(run)
    return tmp_path, coords, logits


def thumbnail_of(root, size: int = 512):
    from mil.evaluation.heatmap import _slide_thumbnail

    return _slide_thumbnail(root / "slides" / "slide_a.tiff", size)


def test_heatmap_png_is_hot_on_tumor(cohort, capsys):
    root, coords, logits = cohort
    argv = ["heatmap", "--run", str(root / "hnm" / "round_2" / "mil"), "--slides", str(root / "slides"),
            "--features", str(root / "features"), "--out", str(root / "heat"), "--thumbnail_size", "512",
            "--geojson_top_k", "5"]
    assert mil_main(argv) == 0
    assert Image.open(root / "heat" / "slide_a_instance.png").size[0] >= 3 * 512  # three panels, full size

    thumbnail, level0 = thumbnail_of(root)
    figure = render(thumbnail, level0, coords, logits, PATCH, "instance")
    for axis in figure.axes[1:3]:  # per-slide rank and absolute score panels
        image = axis.images[0].get_array().astype(float)
        heat = image[..., 0] - image[..., 2]  # turbo: red when high, blue when low
        tumor = heat[96 + 4:192 - 4, 128 + 4:224 - 4].mean()  # the tumor box at thumbnail scale (1/2)
        other = heat[200:288, 240:384].mean()
        assert tumor > other + 60, (axis.get_title(), tumor, other)

    detections = json.loads((root / "heat" / "slide_a_top5.geojson").read_text())["features"]
    assert len(detections) == 5
    for detection in detections:
        (x, y), *_ = detection["geometry"]["coordinates"][0]
        assert in_tumor(np.array([[x, y]]))[0]
        assert detection["properties"]["objectType"] == "detection"

    capsys.readouterr()
    assert mil_main(argv) == 0
    assert "0 written, 1 already done" in capsys.readouterr().out


def test_heatmap_explains_itself(cohort, monkeypatch):
    """Title with slide, label, slide score, split and round; a labelled colour bar under both score panels."""
    import mil.evaluation.heatmap as heatmap

    root, _, _ = cohort
    figures = []
    monkeypatch.setattr(heatmap, "save_figure", lambda figure, path: figures.append(figure))
    assert mil_main(["heatmap", "--run", str(root / "hnm" / "round_2" / "mil"), "--slides", str(root / "slides"),
                     "--features", str(root / "features"), "--out", str(root / "heat"), "--thumbnail_size", "256"]) == 0
    (figure,) = figures
    assert figure._suptitle.get_text() == "slide_a  |  label 1  |  slide score 0.877  |  split test  |  round 2"
    titles = [axis.get_title() for axis in figure.axes if axis.images]
    assert titles == ["slide", "per-slide rank", "absolute score"]
    bars = [axis.get_xlabel() for axis in figure.axes if not axis.images and axis.get_visible()]
    assert bars == [RANK_LABEL, "P(tumor) = sigmoid(patch logit)"]
    assert not figure.legends  # no annotations given: no outline legend


def test_heatmap_attention_and_bad_input(cohort, capsys):
    root, _, _ = cohort
    base = ["heatmap", "--scores", str(root / "run" / "patch_scores"), "--slides", str(root / "slides"),
            "--features", str(root / "features"), "--out", str(root / "heat"), "--thumbnail_size", "256"]
    assert mil_main(base + ["--score", "attention"]) == 0
    assert Image.open(root / "heat" / "slide_a_attention.png").size[0] >= 3 * 256
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
    assert rank_values(np.array([5.0, -1.0, 1000.0, 2.0])) == pytest.approx([0.75, 0.25, 1.0, 0.5])


def test_annotation_outlines_are_drawn_with_a_legend(cohort):
    root, coords, logits = cohort
    x0, y0, x1, y1 = TUMOR
    asap_xml(root / "ann" / "slide_a.xml", {"Tumor": [[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]]})
    from mil.evaluation.heatmap import _annotation_polygons

    thumbnail, level0 = thumbnail_of(root)
    polygons = _annotation_polygons(str(root / "ann"), "slide_a")
    figure = render(thumbnail, level0, coords, logits, PATCH, "instance", polygons)
    for axis in [a for a in figure.axes if a.images]:
        (outline,) = axis.lines
        assert outline.get_color() == pytest.approx((1.0, 0.0, 1.0))  # magenta: tumor
        xs, ys = outline.get_xdata(), outline.get_ydata()
        assert xs.min() == pytest.approx(128) and xs.max() == pytest.approx(224)
        assert ys.min() == pytest.approx(96) and ys.max() == pytest.approx(192)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["tumor annotation"]
