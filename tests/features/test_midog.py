"""MIDOG++ as it is distributed: [x1, y1, x2, y2] boxes, "hard negative" categories, no mpp, no split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures import write_tiny_slide

from features.__main__ import main as features_main
from features.errors import InputError
from features.heads.points import image_mpp, read_coco_images, read_coco_points, split_images


def midog_plus_plus(root: Path, n_images: int = 6) -> tuple[Path, Path, Path, dict[str, str]]:
    """A synthetic point cohort rewritten as the MIDOG++ JSON is shipped; returns (json, images, splits CSV,
    the synthetic splits)."""
    from features.synth.points import PointConfig, write_point_cohort

    cohort = write_point_cohort(root / "pts", PointConfig(n_images=n_images, width=512, height=512, figures=(2, 3),
                                                          imposters=(2, 3), unlabeled_fraction=0.0), progress=False)
    coco = json.loads(cohort.coco_json.read_text())
    splits = {image["file_name"]: image["split"] for image in coco["images"]}
    for image in coco["images"]:
        del image["mpp"], image["split"]
    coco["categories"] = [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "hard negative"}]
    midog = root / "MIDOG++.json"
    midog.write_text(json.dumps(coco))
    csv = root / "splits.csv"
    pd.DataFrame({"file_name": list(splits), "split": list(splits.values())}).to_csv(csv, index=False)
    return midog, cohort.images, csv, splits


def test_midog_json_without_mpp_or_split_reads_both_elsewhere(tmp_path):
    midog, images, csv, splits = midog_plus_plus(tmp_path, n_images=5)
    with pytest.raises(InputError, match="--data.image_dir"):
        read_coco_images(midog)  # no mpp in the JSON and nowhere to read it from
    table = read_coco_images(midog, images, csv)
    assert np.allclose(table["mpp"], 0.25) and set(table["mpp_source"]) == {"image metadata (openslide)"}
    assert dict(zip(table["file_name"], table["split"])) == splits
    seeded = read_coco_images(midog, images, None, seed=3)
    assert sorted(seeded["split"]) == ["test", "train", "train", "train", "val"]
    assert seeded["split"].tolist() == read_coco_images(midog, images, None, seed=3)["split"].tolist()
    points = read_coco_points(midog)
    assert set(points["label"]) == {0, 1}
    with pytest.raises(InputError, match="--data.categories"):
        read_coco_points(midog, {"mitotic figure": 1})  # "hard negative" left unmapped is refused


def test_split_csv_must_name_every_image_with_a_known_split(tmp_path):
    midog, images, csv, _ = midog_plus_plus(tmp_path, n_images=3)
    frame = pd.read_csv(csv)
    frame.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(InputError, match="no split for image"):
        read_coco_images(midog, images, tmp_path / "short.csv")
    frame.assign(split="training").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match="unknown split"):
        read_coco_images(midog, images, tmp_path / "bad.csv")


def test_mpp_from_tiff_resolution_tags_and_none(tmp_path):
    path = write_tiny_slide(tmp_path / "a.tiff", width=256, height=256, mpp=0.2475)
    mpp, source = image_mpp(path)
    assert mpp == pytest.approx(0.2475, rel=1e-3) and "openslide" in source
    from features.heads.points import _tiff_tag_mpp

    assert _tiff_tag_mpp(path) == pytest.approx(0.2475, rel=1e-3)
    with pytest.raises(InputError, match="add 'mpp'"):
        image_mpp(write_tiny_slide(tmp_path / "b.tiff", width=256, height=256, mpp=None))


def test_split_by_image_is_seeded_and_covers_every_split():
    names = pd.Series([f"{i:03d}.tiff" for i in range(10)])
    a, b = split_images(names, seed=1), split_images(names, seed=2)
    assert a.value_counts().to_dict() == {"train": 6, "val": 2, "test": 2}
    assert a.tolist() == split_images(names, seed=1).tolist() and a.tolist() != b.tolist()


def test_midog_shaped_cohort_trains_a_head_and_searches_regimes(tmp_path, capsys):
    midog, images, csv, splits = midog_plus_plus(tmp_path)
    data = ["--data.points", str(midog), "--data.image_dir", str(images), "--data.splits", str(csv),
            "--data.encoder.name", "test_resnet", "--data.sampling.patch_size", "32",
            "--data.sampling.random_per_image", "4", "--data.work_dir", str(tmp_path / "emb")]
    assert features_main(["heads", *data, "--head.min_steps", "30", "--out", str(tmp_path / "head")]) == 0
    predictions = pd.read_csv(tmp_path / "head" / "predictions.csv")
    assert set(predictions["source"]) == {"positive", "imposter", "random"}
    by_image = predictions.groupby("image")["split"].first().to_dict()
    assert by_image == {Path(f).stem: s for f, s in splits.items()}  # the CSV's splits, image by image
    patches = pd.read_csv(next((tmp_path / "emb").glob("points-*/patches.csv")))
    assert set(patches["mpp_source"]) == {"image metadata (openslide)"}  # where each mpp came from is kept
    capsys.readouterr()
    code = features_main(["regimes", *data, "--grid.hard", "[50]", "--grid.random", "[0]", "--grid.folds", "1",
                          "--grid.repeats", "1", "--head.min_steps", "30", "--head.epochs", "2",
                          "--out", str(tmp_path / "regimes")])
    assert code == 0, capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "regimes" / "regimes.csv")) >= 2
