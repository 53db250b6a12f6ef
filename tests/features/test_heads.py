"""Patch-level heads: label sources, stored embeddings with views, training, ablation, backbone selection."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from features.__main__ import main as features_main
from features.encoders import EncoderConfig, create_model
from features.errors import InputError
from features.heads.data import EmbeddingSet, ViewSamplingDataset, encode_labels, load_embeddings
from features.heads.labels import assign_splits, folder_table, polygon_table, stratified_splits
from features.heads.points import PointSampling, point_table
from features.heads.train import HeadConfig, evaluate, load_head, predict_proba, train_head
from fixtures import write_bag
from heads_data import mitosis_like, store_embeddings

torch.set_num_threads(1)
FAST = HeadConfig(epochs=5, min_steps=100, lr=1e-2)


# ------------------------------------------------------------------------------------------- stored embeddings

def test_view_sampling_draws_every_view_and_is_seeded():
    n, dim = 6, 3
    features = np.zeros((n, dim), dtype=np.float32)
    views = np.stack([np.full((n, dim), v, dtype=np.float32) for v in (1, 2, 3)])
    data = EmbeddingSet(features, np.arange(n) % 2, pd.DataFrame({"image": ["a"] * n}), views)
    single = ViewSamplingDataset(data, seed=0)
    seen = {float(single[0][0][0]) for _ in range(60)}  # one item, accessed again and again
    assert seen == {0.0, 1.0, 2.0, 3.0}  # a fresh view per access, not one fixed view per item
    batch = ViewSamplingDataset(data, seed=0).__getitems__(list(range(n)) * 20)[0][:, 0]
    assert set(batch.tolist()) == {0.0, 1.0, 2.0, 3.0}  # the clean embedding and all three views
    no_clean = ViewSamplingDataset(data, include_clean=False, seed=0).__getitems__(list(range(n)) * 20)[0][:, 0]
    assert set(no_clean.tolist()) == {1.0, 2.0, 3.0}
    again = ViewSamplingDataset(data, seed=0).__getitems__(list(range(n)) * 20)[0][:, 0]
    assert torch.equal(batch, again)
    off = ViewSamplingDataset(data, view_sampling=False).__getitems__(list(range(n)))[0]
    assert torch.equal(off, torch.zeros(n, dim))


def test_load_embeddings_joins_rows_by_image_and_position(tmp_path):
    features, table = mitosis_like(n_pos=6, n_imposter=6, n_random=12)
    views = np.stack([features + 1, features + 2])
    table = store_embeddings(tmp_path, features, table, n_images=2, views=views)
    shuffled = table.sample(frac=1.0, random_state=0).reset_index(drop=True)
    data = load_embeddings(tmp_path, shuffled)
    original = table.set_index(["image", "x", "y"]).index.get_indexer(shuffled.set_index(["image", "x", "y"]).index)
    np.testing.assert_allclose(data.features, features[original])
    np.testing.assert_allclose(data.views[1], features[original] + 2)
    assert data.labels.tolist() == shuffled["label"].tolist()
    with pytest.raises(InputError, match="no patch at x=999"):
        load_embeddings(tmp_path, pd.concat([shuffled.iloc[:1].assign(x=999), shuffled]))
    with pytest.raises(InputError, match="no features file"):
        load_embeddings(tmp_path, shuffled.assign(image="elsewhere"))


def test_labels_as_strings_and_splits_by_image():
    labels, classes = encode_labels(pd.Series(["tumor", "normal", "tumor"]))
    assert classes == ("normal", "tumor") and labels.tolist() == [1, 0, 1]
    table = pd.DataFrame({"image": [f"i{k // 3}" for k in range(30)], "label": [k % 2 for k in range(30)]})
    split = assign_splits(table, seed=1)
    assert split.groupby("image")["split"].nunique().max() == 1  # an image never straddles splits
    assert set(split["split"]) == {"train", "val", "test"}
    strat = stratified_splits(table, seed=1)
    assert (strat.groupby(["split", "label"]).size() > 0).all()


# ---------------------------------------------------------------------------------------------------- heads

def shortcut_data(seed: int = 0) -> EmbeddingSet:
    """Train has a strong spurious cue (dim 1, like a stain difference); augmented views randomise it.

    At test time the cue is reversed: a head that relied on it fails; one trained on the views does not.
    """
    rng = np.random.default_rng(seed)
    n, dim = 240, 6
    labels = (np.arange(n) % 2).astype(np.int64)
    split = np.array(["train", "val", "test"])[np.arange(n) // 80]
    features = rng.normal(size=(n, dim)).astype(np.float32)
    features[:, 0] += 1.5 * labels
    cue = np.where(split == "test", -3.0, 3.0)
    features[:, 1] += cue * labels
    views = np.repeat(features[None], 4, axis=0)
    views[:, :, 1] = rng.normal(scale=3.0, size=(4, n))
    views += rng.normal(scale=0.1, size=views.shape).astype(np.float32)
    table = pd.DataFrame({"image": "a", "x": np.arange(n), "y": 0, "label": labels, "source": "s", "split": split})
    return EmbeddingSet(features, labels, table, views.astype(np.float32))


def test_view_sampling_removes_a_shortcut():
    data = shortcut_data()
    splits = {name: data.split(name) for name in ("train", "val", "test")}
    plain = train_head(splits["train"], FAST.__class__(**{**FAST.__dict__, "view_sampling": False}))
    views = train_head(splits["train"], FAST.__class__(**{**FAST.__dict__, "include_clean": False}))
    plain_auc = evaluate(plain, splits)["test_auroc"]
    views_auc = evaluate(views, splits)["test_auroc"]
    assert plain_auc < 0.5 < 0.75 < views_auc


def test_heads_command_trains_saves_and_reloads(tmp_path, capsys):
    features, table = mitosis_like(n_random=80, seed=3)
    table = store_embeddings(tmp_path / "emb", features, table, views=np.stack([features * 1.01, features * 0.99]))
    table.to_csv(tmp_path / "table.csv", index=False)
    argv = ["heads", "--data.embeddings", str(tmp_path / "emb"), "--data.table", str(tmp_path / "table.csv"),
            "--head.hidden", "16", "--head.min_steps", "60", "--head.noise_std", "0.1", "--out", str(tmp_path / "h")]
    assert features_main(argv) == 0
    info = json.loads((tmp_path / "h" / "head.json").read_text())
    assert info["n_views"] == 2 and info["config"]["hidden"] == 16 and info["metrics"]["val_auroc"] > 0.8
    module, _ = load_head(tmp_path / "h")
    predictions = pd.read_csv(tmp_path / "h" / "predictions.csv")
    data = load_embeddings(tmp_path / "emb", table)
    np.testing.assert_allclose(predict_proba(module, data.features)[:, 1], predictions["score"], rtol=1e-5, atol=1e-6)
    # Same command, same numbers.
    assert features_main(argv[:-1] + [str(tmp_path / "h2")]) == 0
    again = pd.read_csv(tmp_path / "h2" / "predictions.csv")
    np.testing.assert_allclose(again["score"], predictions["score"], atol=1e-6)
    assert "trained in" in capsys.readouterr().out


def test_ablation_command_prints_every_variant(tmp_path, capsys):
    data = shortcut_data(seed=1)
    table = store_embeddings(tmp_path / "emb", data.features, data.table.drop(columns=["image", "x", "y"]),
                             views=data.views)
    table.to_csv(tmp_path / "table.csv", index=False)
    code = features_main(["heads", "--ablation", "--data.embeddings", str(tmp_path / "emb"), "--data.table",
                          str(tmp_path / "table.csv"), "--head.min_steps", "60", "--head.include_clean", "false",
                          "--head.lr", "0.01", "--out", str(tmp_path / "abl")])
    assert code == 0
    result = pd.read_csv(tmp_path / "abl" / "ablation.csv").set_index("variant")
    assert list(result.index) == ["plain", "views", "noise", "views+noise", "views+noise+mixup"]
    assert result.loc["views", "test_auroc"] > result.loc["plain", "test_auroc"] + 0.2
    assert "views+noise" in capsys.readouterr().out


def test_heads_without_data_is_input_error(tmp_path, capsys):
    assert features_main(["heads", "--out", str(tmp_path)]) == 2
    assert "--data.embeddings" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- label sources

def test_point_table_centres_and_keeps_negatives_away(tmp_path):
    images = pd.DataFrame({"file_name": ["a.tiff", "b.tiff", "u.tiff"], "width": 400, "height": 400,
                           "mpp": [0.25, 0.5, 0.25], "split": ["train", "val", "unlabeled"]})
    points = pd.DataFrame({"file_name": ["a.tiff", "a.tiff", "b.tiff"], "x": [100.0, 300.0, 200.0],
                           "y": [100.0, 300.0, 200.0], "label": [1, 0, 1]})
    sampling = PointSampling(target_mpp=0.25, patch_size=64, random_per_image=30, unlabeled_per_image=5,
                             min_distance_um=20.0)
    table = point_table(points, images, sampling)
    a = table[table["image"] == "a"]
    positive = a[a["source"] == "positive"].iloc[0]
    assert (positive["x"], positive["y"]) == (68, 68)  # 64 px at 0.25 µm/px on a 0.25 µm/px image
    b_pos = table[(table["image"] == "b") & (table["source"] == "positive")].iloc[0]
    assert (b_pos["x"], b_pos["y"]) == (184, 184)  # 16 µm is 32 px at 0.5 µm/px
    assert (a["source"] == "imposter").sum() == 1 and (a.loc[a["source"] == "imposter", "label"] == 0).all()
    for image, mpp, centre in (("a", 0.25, (100, 100)), ("b", 0.5, (200, 200))):
        rand = table[(table["image"] == image) & (table["source"] == "random")]
        assert len(rand) == 30
        distance_um = np.hypot(rand["cx"] - centre[0], rand["cy"] - centre[1]) * mpp
        assert distance_um.min() >= 20.0
    unlabeled = table[table["image"] == "u"]
    assert len(unlabeled) == 5 and set(unlabeled["source"]) == {"unlabeled"} and (unlabeled["label"] == 0).all()


def test_polygon_table_labels_by_overlap(tmp_path):
    coords = np.array([[0, 0], [100, 0], [200, 0], [300, 0]])
    write_bag(tmp_path / "coords" / "s1.h5", np.zeros((4, 2)), coords=coords, patch_size_level0=100)
    write_bag(tmp_path / "coords" / "s2.h5", np.zeros((2, 2)), coords=coords[:2], patch_size_level0=100)
    square = [[0, 0], [150, 0], [150, 100], [0, 100], [0, 0]]  # all of patch 0, half of patch 1
    feature = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
               "geometry": {"type": "Polygon", "coordinates": [square]}}
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "s1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    table = polygon_table(tmp_path / "coords", tmp_path / "ann", min_overlap=0.9)
    s1 = table[table["image"] == "s1"]
    assert s1["x"].tolist() == [0, 200, 300]  # the half-covered patch is ambiguous and left out
    assert s1["label"].tolist() == [1, 0, 0]
    assert (table.loc[table["image"] == "s2", "label"] == 0).all()


def write_image_folder(root, per_class: int = 10, size: int = 32):
    rng = np.random.default_rng(0)
    for name, base in (("dark", 60), ("light", 190)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


def test_select_ranks_the_encoder_that_sees_the_signal_first(tmp_path, capsys):
    root = write_image_folder(tmp_path / "proxy")
    blind = create_model(EncoderConfig(name="test_resnet"))
    save_file({k: torch.zeros_like(v) for k, v in blind.state_dict().items()}, str(tmp_path / "blind.safetensors"))
    config = tmp_path / "select.yaml"
    config.write_text(
        "candidates:\n"
        f"  - {{name: test_resnet, weights: {tmp_path / 'blind.safetensors'}, input_size: 32, tag: blind}}\n"
        "  - {name: test_resnet, input_size: 32, tag: random-init}\n"
        f"proxy: {{images: {root}, folds: 4}}\n"
    )
    assert features_main(["select", "--config", str(config), "--out", str(tmp_path / "sel")]) == 0
    ranked = pd.read_csv(tmp_path / "sel" / "select.csv")
    assert ranked["tag"].tolist() == ["random-init", "blind"]
    assert ranked.loc[0, "linear_bacc"] > 0.9 and ranked.loc[1, "linear_bacc"] <= 0.6
    assert ranked["dim"].tolist() == [96, 96] and (ranked["embed_seconds"] > 0).all()
    assert "best: random-init" in capsys.readouterr().out


def test_folder_source_trains_a_head(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=8)
    assert len(folder_table(root)) == 16
    assert features_main(["heads", "--data.images", str(root), "--data.encoder.name", "test_resnet",
                          "--data.encoder.input_size", "32", "--head.min_steps", "40", "--out", str(tmp_path / "o")]) == 0
    info = json.loads((tmp_path / "o" / "head.json").read_text())
    assert info["classes"] == ["dark", "light"] and info["metrics"]["test_balanced_accuracy"] > 0.7


def test_points_are_embedded_through_extraction_with_views(tmp_path):
    from features.synth.points import PointConfig, write_point_cohort

    cohort = write_point_cohort(tmp_path / "pts", PointConfig(n_images=4, width=256, height=256, figures=(2, 3),
                                                              imposters=(2, 3)), progress=False)
    argv = ["heads", "--data.points", str(cohort.coco_json), "--data.image_dir", str(cohort.images),
            "--data.encoder.name", "test_resnet", "--data.sampling.patch_size", "32", "--data.views", "2",
            "--data.sampling.random_per_image", "3", "--data.sampling.unlabeled_per_image", "3",
            "--data.work_dir", str(tmp_path / "emb"), "--head.min_steps", "30", "--out", str(tmp_path / "o")]
    assert features_main(argv) == 0
    info = json.loads((tmp_path / "o" / "head.json").read_text())
    assert info["n_views"] == 2
    predictions = pd.read_csv(tmp_path / "o" / "predictions.csv")
    assert set(predictions["source"]) == {"positive", "imposter", "random", "unlabeled"}
    assert (predictions.loc[predictions["source"] == "unlabeled", "split"] == "train").all()
    stored = list((tmp_path / "emb").glob("points-*/features/*/*.h5"))
    assert len(stored) == 4
    # A rerun reuses the stored embeddings (same table, same settings -> same folder, files kept).
    stamps = {path: path.stat().st_mtime_ns for path in stored}
    assert features_main(argv[:-1] + [str(tmp_path / "o2")]) == 0
    assert {path: path.stat().st_mtime_ns for path in stored} == stamps
    again = pd.read_csv(tmp_path / "o2" / "predictions.csv")
    np.testing.assert_allclose(again["score"], predictions["score"], atol=1e-6)
    # Every encoder setting reaches extraction (normalisation here): it was rebuilt from a few fields, so the
    # model card's mean/std were dropped and the default-normalised embeddings above were silently reused.
    card = ["--data.encoder.mean", "[0.1,0.2,0.3]", "--data.encoder.std", "[0.2,0.2,0.2]"]
    assert features_main([*argv[:-1], str(tmp_path / "o3"), *card]) == 0
    remade = [p for p in (tmp_path / "emb").glob("points-*/features/*/*.h5") if p not in stamps]
    assert len(remade) == 4
    with h5py.File(remade[0]) as h5:
        assert json.loads(h5["features"].attrs["transform"])["mean"] == pytest.approx([0.1, 0.2, 0.3])


@pytest.mark.parametrize("name", ["heads_points", "heads_table", "select", "regimes", "regimes_hard"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    from features.heads.cli import heads_parser
    from features.heads.regimes import regimes_parser
    from features.heads.select import select_parser

    path = Path(__file__).parents[2] / "configs" / "heads" / f"{name}.yaml"
    parser = {"select": select_parser, "regimes": regimes_parser, "regimes_hard": regimes_parser}.get(name, heads_parser)()
    cfg = parser.instantiate_classes(parser.parse_args(["--config", str(path), "--out", "x"]))
    if name == "select":
        assert len(cfg.candidates) == 3 and cfg.candidates[0].name == "resnet18"
    else:
        assert cfg.head.epochs == 30
    if name.startswith("regimes"):
        assert cfg.grid.repeats == 3 and cfg.data.sampling.random_per_image == 40


def test_hard_point_preset_mixes_imposter_kinds_and_checks_names():
    from features.synth.points import IMPOSTER_KINDS, imposter_kinds, point_config, render_point_image

    config = point_config("hard", n_images=1, width=384, height=384)
    assert config.imposter_kinds == IMPOSTER_KINDS and config.mpp == 0.25
    image, figures, imposters = render_point_image(np.random.default_rng(0), config)
    assert image.shape == (384, 384, 3) and len(figures) >= 1 and len(imposters) >= 1
    drawn = imposter_kinds(np.random.default_rng(0), IMPOSTER_KINDS, 400)
    assert set(drawn) == set(IMPOSTER_KINDS)
    rng = np.random.default_rng(0)  # one kind draws nothing, so default cohorts render as they always did
    assert list(imposter_kinds(rng, ("apoptotic",), 3)) == ["apoptotic"] * 3 and rng.uniform() == np.random.default_rng(0).uniform()
    with pytest.raises(InputError, match="imposter_kinds"):
        point_config("demo", imposter_kinds=("mitosis",))
    with pytest.raises(InputError, match="unknown in points mode"):
        point_config("huge")


def write_stripe_folder(root, per_class: int = 12, size: int = 64):
    """Two classes that differ only in the orientation of 2-px stripes: same colours, same mean, same noise."""
    rng = np.random.default_rng(1)
    stripes = (np.arange(size) % 2 * 80.0)[:, None] * np.ones((1, size))
    for name, pattern in (("horizontal", stripes), ("vertical", stripes.T)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = 90 + pattern[..., None] + rng.normal(0, 12, size=(size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def test_select_prefers_the_encoder_input_that_resolves_the_cue(tmp_path):
    """Two working encoders, one fed at full resolution and one at 8 px: the one that can see the stripes wins."""
    root = write_stripe_folder(tmp_path / "proxy")
    config = tmp_path / "select.yaml"
    config.write_text(
        "candidates:\n"
        "  - {name: test_resnet, input_size: 8, tag: coarse}\n"
        "  - {name: test_resnet, input_size: 64, tag: full-resolution}\n"
        f"proxy: {{images: {root}, folds: 4}}\n"
    )
    assert features_main(["select", "--config", str(config), "--out", str(tmp_path / "sel")]) == 0
    ranked = pd.read_csv(tmp_path / "sel" / "select.csv")
    assert ranked["tag"].tolist() == ["full-resolution", "coarse"]
    assert ranked.loc[0, "linear_bacc"] >= 0.9 and ranked.loc[1, "linear_bacc"] <= 0.7
