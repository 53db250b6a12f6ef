"""The synthetic cohort, written for real and read back with OpenSlide, pandas and the annotation reader."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage
from shapely.ops import unary_union

from features.__main__ import main as features_main
from features.annotations import read_points, read_polygons
from features.errors import InputError
from features.synth import PRESETS, CohortConfig, PointConfig, plan_cohort, write_cohort, write_point_cohort
from features.synth.cli import main as synth_main

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), TINY, progress=False)


def read_level0(slide: openslide.OpenSlide) -> np.ndarray:
    return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def region_labels(groups: dict, shape: tuple[int, int]) -> np.ndarray:
    """0 elsewhere, 1 tumor, 2 look-alike: the annotations rasterised at level 0."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for value, group in ((1, "tumor"), (2, "lookalike")):
        for polygon in groups.get(group, []):
            draw.polygon([tuple(p) for p in np.asarray(polygon.exterior.coords)], fill=value)
    return np.asarray(canvas)


def test_slides_open_with_openslide_at_their_true_mpp(cohort):
    slides = pd.read_csv(cohort.slides_csv)
    plan = plan_cohort(TINY)
    assert list(slides.columns) == ["slide_id", "path", "mpp"]
    assert sorted(slides["mpp"].unique()) == [0.25, 0.5]
    for row, planned in zip(slides.itertuples(), plan.itertuples()):
        slide = openslide.OpenSlide(cohort.slides_csv.parent / row.path)  # paths are relative to the CSV
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(row.mpp, rel=1e-4)
        assert slide.dimensions == (planned.width, planned.height)
        assert slide.dimensions[0] == (2400 if row.mpp == 0.25 else 1200)
        assert slide.level_count >= 2
        assert slide.level_downsamples[1] == pytest.approx(2.0)
        assert max(slide.level_dimensions[-1]) <= 512


def test_regions_lie_in_tissue_and_are_a_few_percent(cohort):
    labels = pd.read_csv(cohort.labels_csv)
    slides = pd.read_csv(cohort.slides_csv).set_index("slide_id")
    lookalikes = {"tumor": 0, "normal": 0}
    for row in labels.itertuples():
        groups = read_polygons(cohort.annotations / f"{row.slide_id}.xml")
        slide = openslide.OpenSlide(cohort.slides_csv.parent / slides.loc[row.slide_id, "path"])
        image = read_level0(slide)
        tissue = image.mean(axis=-1) < 225
        regions = region_labels(groups, image.shape[:2])
        lookalikes[row.label] += len(groups.get("lookalike", []))
        assert tissue[regions > 0].mean() > 0.97  # annotated regions are tissue
        if row.label == "normal":
            assert "tumor" not in groups
            continue
        tumor_share = (regions == 1).sum() / tissue.sum()
        assert 0.002 < tumor_share < 0.08, row.slide_id
        assert not set(np.unique(regions[regions > 0])) - {1, 2}
    assert lookalikes["tumor"] > 0 and lookalikes["normal"] > 0


def opened_dark_share(image: np.ndarray, mpp: float) -> np.ndarray:
    """Dark (nuclear) pixels that survive an opening by a 3.6 um disk: a nucleus-size proxy.

    Lymphocytes (radius ~2.8 um) vanish, look-alike nuclei (~4.8 um) mostly stay, tumor nuclei (~5.6 um, crowded)
    stay most.
    """
    red = ndimage.gaussian_filter(image[..., 0].astype(np.float32), 0.5 / mpp)
    radius = int(round(3.6 / mpp))
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return ndimage.binary_opening(red < 165, structure=x * x + y * y <= radius * radius)


def test_tumor_nuclei_are_larger_and_lookalikes_sit_between(cohort):
    labels = pd.read_csv(cohort.labels_csv)
    slides = pd.read_csv(cohort.slides_csv).set_index("slide_id")
    shares = {"tumor": [], "lookalike": [], "normal": []}
    colors = {"tumor": [], "lookalike": [], "normal": []}
    for row in labels[labels["label"] == "tumor"].itertuples():
        mpp = slides.loc[row.slide_id, "mpp"]
        image = read_level0(openslide.OpenSlide(cohort.slides_csv.parent / slides.loc[row.slide_id, "path"]))
        groups = read_polygons(cohort.annotations / f"{row.slide_id}.xml")
        regions = region_labels(groups, image.shape[:2])
        annotated = unary_union(groups.get("tumor", []) + groups.get("lookalike", []))
        x0, y0, x1, y1 = (int(v) for v in annotated.buffer(150).bounds)
        window = slice(max(0, y0), y1), slice(max(0, x0), x1)  # the opening is costly: only near the regions
        image, regions = image[window], regions[window]
        tissue = ndimage.binary_erosion(image.mean(axis=-1) < 225, iterations=20)
        big = opened_dark_share(image, mpp)
        for name, mask in (("tumor", regions == 1), ("lookalike", regions == 2), ("normal", tissue & (regions == 0))):
            mask = ndimage.binary_erosion(mask, iterations=3)
            shares[name].append(big[mask].mean())
            colors[name].append(image[mask].mean(axis=0))
    share = {name: float(np.mean(values)) for name, values in shares.items()}
    assert share["tumor"] > share["lookalike"] + 0.05
    assert share["lookalike"] > share["normal"] + 0.2
    # Colour is the superficial cue: look-alikes are closer in mean colour to tumor than normal tissue is.
    color = {name: np.mean(values, axis=0) for name, values in colors.items()}
    assert np.linalg.norm(color["lookalike"] - color["tumor"]) < np.linalg.norm(color["normal"] - color["tumor"])


def test_labels_splits_and_folds_are_case_grouped_stratified_and_seeded():
    config = CohortConfig(n_slides=40, folds=5, seed=3)
    plan = plan_cohort(config)
    assert plan.equals(plan_cohort(config))
    assert not plan.equals(plan_cohort(replace(config, seed=4)))
    assert (plan["label"] == "tumor").sum() == 20
    assert plan.groupby("case_id").size().max() == 2  # some cases have two slides
    assert plan["site"].nunique() == 3
    for column in ["split"] + [f"fold_{k}" for k in range(5)]:
        assert (plan.groupby("case_id")[column].nunique() == 1).all(), column  # a case never straddles
        for split in ("train", "val", "test"):
            assert set(plan.loc[plan[column] == split, "label"]) == {"tumor", "normal"}, (column, split)
    test_cases = [set(plan.loc[plan[f"fold_{k}"] == "test", "case_id"]) for k in range(5)]
    assert set.union(*test_cases) == set(plan["case_id"])
    assert sum(len(c) for c in test_cases) == plan["case_id"].nunique()  # each case tested exactly once


def test_same_seed_same_bytes_and_reruns_resume(tmp_path):
    config = CohortConfig(n_slides=2, width=600, height=500, high_res_fraction=0.5, seed=7)
    first = write_cohort(tmp_path / "a", config, progress=False)
    second = write_cohort(tmp_path / "b", config, progress=False)
    for folder in ("slides", "annotations"):
        for path in sorted((tmp_path / "a" / folder).iterdir()):
            assert path.read_bytes() == (tmp_path / "b" / folder / path.name).read_bytes(), path.name
    assert first.labels_csv.read_text() == second.labels_csv.read_text()
    assert first.slides_csv.read_text() == second.slides_csv.read_text()

    slide = first.slides / "slide_000.tiff"
    before = slide.stat().st_mtime_ns
    removed = first.slides / "slide_001.tiff"
    expected = removed.read_bytes()
    removed.unlink()
    again = write_cohort(tmp_path / "a", config, progress=False)
    status = again.summary.set_index("slide_id")["status"]
    assert status.to_dict() == {"slide_000": "skipped", "slide_001": "written"}
    assert slide.stat().st_mtime_ns == before
    assert removed.read_bytes() == expected
    assert not [p for p in tmp_path.rglob("*.tmp-*")]
    with pytest.raises(InputError, match="other settings.*seed"):
        write_cohort(tmp_path / "a", replace(config, seed=8), progress=False)


def test_cli_writes_cohort_and_rejects_bad_options(tmp_path, capsys):
    synth_main(["--out", str(tmp_path / "c"), "--preset", "tiny", "--n_slides", "2", "--width", "512",
                "--height", "400", "--high_res_fraction", "0", "--folds", "3"])
    labels = pd.read_csv(tmp_path / "c" / "labels.csv")
    assert list(labels.columns) == ["slide_id", "label", "case_id", "site", "split", "fold_0", "fold_1", "fold_2"]
    assert "2 slides (2 written" in capsys.readouterr().out
    assert features_main(["synth", "--out", str(tmp_path / "d"), "--folds", "2"]) == 2
    assert "--folds" in capsys.readouterr().err


def test_point_mode_writes_midog_style_coco(tmp_path):
    config = PointConfig(n_images=4, width=512, height=512, seed=1)
    paths = write_point_cohort(tmp_path / "points", config, progress=False)
    images = pd.read_csv(paths.images_csv)
    assert sorted(images["split"]) == ["test", "train", "unlabeled", "val"]
    coco = json.loads(paths.coco_json.read_text())
    assert [c["name"] for c in coco["categories"]] == ["mitotic figure", "not mitotic figure"]
    assert [(i["file_name"], i["split"], i["mpp"]) for i in coco["images"]] == list(
        zip(images["file_name"], images["split"], images["mpp"]))
    points = read_points(paths.coco_json)
    unlabeled = set(images.loc[images["split"] == "unlabeled", "file_name"])
    assert unlabeled and not unlabeled & set(points["file_name"])
    assert set(points["label"]) == {0, 1}
    assert (points.groupby("file_name")["label"].sum() >= config.figures[0]).all()
    for file_name, group in points.groupby("file_name"):
        slide = openslide.OpenSlide(paths.images / file_name)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25, rel=1e-4)
        image = read_level0(slide).astype(np.float32)
        # Both kinds are dark at their centre; imposters sit in a pink (eosinophilic) rim, figures in a clear zone.
        for row in group.itertuples():
            x, y = int(row.x), int(row.y)
            assert image[y - 3:y + 4, x - 10:x + 11].min() < 110
        rims = {label: np.mean([_ring(image, int(r.x), int(r.y), 17, 22) for r in rows.itertuples()])
                for label, rows in group.groupby("label")}
        assert rims[0] > rims[1] + 10  # red minus green is higher around imposters
    again = write_point_cohort(tmp_path / "points", config, progress=False)
    assert again.coco_json.read_text() == paths.coco_json.read_text()


def _ring(image: np.ndarray, x: int, y: int, inner: int, outer: int) -> float:
    """Mean red-minus-green over an annulus around (x, y)."""
    yy, xx = np.mgrid[-outer:outer + 1, -outer:outer + 1]
    ring = (xx * xx + yy * yy >= inner * inner) & (xx * xx + yy * yy <= outer * outer)
    patch = image[y - outer:y + outer + 1, x - outer:x + outer + 1]
    return float((patch[..., 0] - patch[..., 1])[ring[:patch.shape[0], :patch.shape[1]]].mean())


def test_demo_lookalikes_are_commoner_on_tumor_slides_and_closer_to_tumor():
    from features.synth import cells
    from features.synth.render import SlideSpec, plan_layout

    demo = PRESETS["demo"]
    shares = {}
    for tumor in (True, False):
        spec = SlideSpec("s", tumor=tumor, width=1500, height=1200, mpp=1.0, seed=3, coverage=(0.5, 0.6),
                         lookalike_area=demo.lookalike_area, tumor_lookalike_area=demo.tumor_lookalike_area)
        layout = plan_layout(spec, np.random.default_rng(3))
        shares[tumor] = sum(p.area for p in layout.lookalike) / layout.tissue_area
    assert shares[True] > 2.5 * shares[False]
    assert demo.lookalike_area[0] * 0.5 <= shares[False] <= demo.lookalike_area[1]

    # Mimicry moves colour and size to tumor's and fades the halos; the smooth outline and even chromatin stay.
    where = np.ones((400, 400), dtype=bool)
    plain, halo = cells.lookalike_cells(np.random.default_rng(0), where, 0.5, mimicry=0.0)
    mimic, faded = cells.lookalike_cells(np.random.default_rng(0), where, 0.5, mimicry=1.0)
    np.testing.assert_allclose(cells.lookalike_color(1.0), cells.TUMOR_COLOR)
    np.testing.assert_allclose(cells.lookalike_color(0.0), cells.LOOKALIKE_COLOR)
    tumor = cells.tumor_cells(np.random.default_rng(0), where, 0.5)
    size = lambda n: float(np.mean(np.sqrt(n.a * n.b)))  # noqa: E731
    assert size(plain) < size(mimic) and abs(size(mimic) - size(tumor)) < 0.15 * size(tumor)
    assert halo.opacity.min() > 0.5 and faded.opacity.max() == 0
    assert mimic.rim.max() == 0 and mimic.nucleolus.max() == 0 and tumor.rim.min() > 0


def test_cohorts_written_before_an_option_existed_still_resume(tmp_path):
    config = CohortConfig(n_slides=2, width=400, height=300, high_res_fraction=0.0, seed=2)
    write_cohort(tmp_path, config, progress=False)
    settings = json.loads((tmp_path / "synth_config.json").read_text())
    del settings["config"]["lookalike_mimicry"]  # as an older version wrote it
    (tmp_path / "synth_config.json").write_text(json.dumps(settings))
    assert set(write_cohort(tmp_path, config, progress=False).summary["status"]) == {"skipped"}
    with pytest.raises(InputError, match="lookalike_mimicry"):
        write_cohort(tmp_path, replace(config, lookalike_mimicry=0.5), progress=False)


def test_cli_points_mode_takes_the_hard_preset_and_slides_mode_refuses_it(tmp_path, capsys):
    synth_main(["--mode", "points", "--preset", "hard", "--n_slides", "2", "--width", "256", "--height", "256",
                "--out", str(tmp_path / "p")])
    assert len(pd.read_csv(tmp_path / "p" / "images.csv")) == 2
    assert features_main(["synth", "--preset", "hard", "--out", str(tmp_path / "s")]) == 2
    assert "hard" in capsys.readouterr().err


def test_mimic_preset_lookalikes_take_tumors_look_and_outnumber_it_on_tumor_slides(tmp_path):
    from features.synth import cells
    from features.synth.render import SlideSpec, plan_layout

    mimic = PRESETS["mimic"]
    assert mimic.lookalike_mimicry == 1.0
    np.testing.assert_allclose(cells.lookalike_color(mimic.lookalike_mimicry), cells.TUMOR_COLOR)
    shares = {}
    for tumor in (True, False):
        spec = SlideSpec("s", tumor=tumor, width=1500, height=1200, mpp=1.0, seed=3, coverage=(0.5, 0.6),
                         tumor_area=mimic.tumor_area, lookalike_area=mimic.lookalike_area,
                         tumor_lookalike_area=mimic.tumor_lookalike_area)
        layout = plan_layout(spec, np.random.default_rng(3))
        shares[tumor] = (sum(p.area for p in layout.lookalike) / layout.tissue_area,
                         sum(p.area for p in layout.tumor) / layout.tissue_area)
    # On a tumor slide look-alikes cover more tissue than tumor does, and several times their share on normal slides.
    assert shares[True][0] > shares[True][1] > 0 and shares[True][0] > 5 * shares[False][0]
    synth_main(["--out", str(tmp_path / "m"), "--preset", "mimic", "--n_slides", "2", "--width", "400",
                "--height", "300", "--high_res_fraction", "0"])
    recorded = json.loads((tmp_path / "m" / "synth_config.json").read_text())["config"]
    assert recorded["lookalike_mimicry"] == 1.0 and recorded["tumor_lookalike_area"] == list(mimic.tumor_lookalike_area)


def test_site_cast_scales_how_far_a_sites_colours_move(tmp_path, capsys):
    from features.synth.render import SlideSpec, render_slide, site_tint

    np.testing.assert_array_equal(site_tint(1), np.float32([1.03, 0.96, 0.98]))  # cast 1: the cohorts as before
    np.testing.assert_array_equal(site_tint(2, 0.0), np.ones(3, dtype=np.float32))
    means = {}
    for cast in (0.0, 1.0, 3.0):
        image, _ = render_slide(SlideSpec("s", tumor=False, width=400, height=300, mpp=1.0, seed=5, site=1,
                                          coverage=(0.5, 0.6), site_cast=cast))
        means[cast] = image.reshape(-1, 3).astype(np.float64).mean(axis=0)
    red_over_green = {cast: np.log(m[0] / m[1]) for cast, m in means.items()}
    shift_1, shift_3 = red_over_green[1.0] - red_over_green[0.0], red_over_green[3.0] - red_over_green[0.0]
    assert shift_1 > 0.03 and shift_3 == pytest.approx(3 * shift_1, rel=0.25)
    synth_main(["--out", str(tmp_path / "c"), "--n_slides", "2", "--width", "400", "--height", "300",
                "--high_res_fraction", "0", "--site_cast", "3"])
    assert json.loads((tmp_path / "c" / "synth_config.json").read_text())["config"]["site_cast"] == 3.0
    assert features_main(["synth", "--out", str(tmp_path / "d"), "--site_cast", "9"]) == 2
    assert "--site_cast 9.0: use 0 (no cast) to 5" in capsys.readouterr().err
