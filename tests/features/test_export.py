"""`features export` to CLAM and TRIDENT folders, read back by re-implementations of those tools' loaders and
by our own commands (heatmap, patch evaluation, fine-tuning geometry)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from eval_inputs import asap_xml, write_patch_scores
from fixtures import write_bag, write_tiny_slide

from features.__main__ import main as features_main
from features.errors import InputError
from features.layouts import level0_patch_size, patch_geometry
from features.store import find_feature_files, read_bag
from mil.__main__ import main as mil_main

PATCH = 64


def grid(n_x: int, n_y: int, x0: int = 0, y0: int = 0) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(n_x) * PATCH + x0, np.arange(n_y) * PATCH + y0)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


@pytest.fixture
def store(tmp_path) -> Path:
    """Our store's features folder: two slides of a patch grid, 8-dim features."""
    folder = tmp_path / "store" / "features" / "resnet18"
    rng = np.random.default_rng(0)
    for slide_id, n in (("slide_a", 4), ("slide_b", 3)):
        write_bag(folder / f"{slide_id}.h5", rng.normal(size=(n * n, 8)), grid(n, n), patch_size_level0=PATCH)
    return folder


def clam_mil_item(data_dir: Path, slide_id: str, use_h5: bool):
    """CLAM's Generic_MIL_Dataset.__getitem__: pt_files/<id>.pt through torch.load(weights_only=True), or
    h5_files/<id>.h5 'features' and 'coords' turned into a tensor."""
    if not use_h5:
        return torch.load(os.path.join(data_dir, "pt_files", f"{slide_id}.pt"), weights_only=True)
    with h5py.File(os.path.join(data_dir, "h5_files", f"{slide_id}.h5"), "r") as h5:
        features, coords = h5["features"][:], h5["coords"][:]
    return torch.from_numpy(features), coords


def trident_read(job_dir: Path, encoder: str, slide_id: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """TRIDENT's readers: patches/<id>_patches.h5 coords and their attributes (patch_size, level0_magnification
    and target_magnification are required, else TRIDENT falls back to CLAM's legacy format), the level-0 patch
    side as its patcher computes it, and features_<encoder>/<id>.h5."""
    with h5py.File(job_dir / "patches" / f"{slide_id}_patches.h5", "r") as h5:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5["coords"].attrs.items()}
        coords = np.array(h5["coords"])
    for key in ("patch_size", "level0_magnification", "target_magnification"):
        assert attrs.get(key) is not None, key
    attrs["patch_size_src"] = round(attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"])
    with h5py.File(job_dir / f"features_{encoder}" / f"{slide_id}.h5", "r") as h5:
        features = h5["features"][:]
        assert np.array_equal(h5["coords"][:], coords)
    return attrs, coords, features


def test_clam_export_reads_in_clams_loader_and_back(store, tmp_path, capsys):
    out = tmp_path / "clam"
    assert features_main(["export", "--layout", "clam", "--features", str(store), "--out", str(out)]) == 0
    for slide_id in ("slide_a", "slide_b"):
        ours = read_bag(store / f"{slide_id}.h5")
        pt = clam_mil_item(out, slide_id, use_h5=False)
        assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and tuple(pt.shape) == (len(ours), 8)
        np.testing.assert_array_equal(pt.numpy(), ours.features)
        features, coords = clam_mil_item(out, slide_id, use_h5=True)
        np.testing.assert_array_equal(features.numpy(), ours.features)
        np.testing.assert_array_equal(coords, ours.coords)
        assert os.path.samefile(out / "h5_files" / f"{slide_id}.h5", store / f"{slide_id}.h5")  # linked, not copied
    # Round trip: the CLAM folder is a feature folder for every reader of ours.
    back = find_feature_files(out)
    assert sorted(back) == ["slide_a", "slide_b"] and level0_patch_size(back["slide_a"]) == PATCH
    capsys.readouterr()
    assert features_main(["export", "--layout", "clam", "--features", str(store), "--out", str(out)]) == 0
    assert "0 file(s) written" in capsys.readouterr().out  # resumable: finished files are kept


def test_trident_export_reads_in_tridents_loader_and_back(store, tmp_path, capsys):
    out = tmp_path / "trident"
    assert features_main(["export", "--layout", "trident", "--features", str(store), "--out", str(out)]) == 0
    for slide_id in ("slide_a", "slide_b"):
        ours = read_bag(store / f"{slide_id}.h5")
        attrs, coords, features = trident_read(out, "resnet18", slide_id)
        np.testing.assert_array_equal(coords, ours.coords)
        np.testing.assert_array_equal(features, ours.features)
        assert attrs["patch_size_level0"] == PATCH == attrs["patch_size_src"]
        assert attrs["level0_magnification"] == 20 and attrs["target_magnification"] == 20  # 0.5 µm/px
        assert attrs["name"] == slide_id and attrs["overlap"] == 0 and attrs["level0_width"] > 0
    back = find_feature_files(out)
    assert sorted(back) == ["slide_a", "slide_b"]
    bag = read_bag(back["slide_b"])
    assert bag.coord_attrs["mpp_level0"] == 0.5 and level0_patch_size(back["slide_b"]) == PATCH
    # Another encoder name into the same folder would mix two exports: refused in one line.
    code = features_main(["export", "--layout", "trident", "--features", str(store), "--out", str(out),
                          "--encoder", "uni"])
    assert code == 2 and "encoder='resnet18'" in capsys.readouterr().err


def test_store_keeps_grid_positions_one_step_apart(store):
    with h5py.File(store / "slide_a.h5", "r") as h5:
        positions, coords = h5["grid"][:], h5["coords"][:]
        assert h5["grid"].attrs["grid_step_level0"] == PATCH
    np.testing.assert_array_equal(positions * PATCH, coords)
    assert positions.max() == 3  # a 4 x 4 grid: columns and rows 0..3, neighbours one apart
    free = write_bag(store.parent / "free" / "points.h5", np.zeros((2, 8)), np.array([[10, 30], [97, 5]]))
    with h5py.File(free, "r") as h5:
        assert "grid" not in h5  # free-placed patches (point candidates) lie on no grid: none is claimed


def test_torchmil_builds_neighbours_from_our_trident_export(store, tmp_path):
    torchmil = pytest.importorskip("torchmil")  # skipped only when torchmil is not installed
    from torchmil.datasets import TridentWSIDataset

    out = tmp_path / "trident"
    assert features_main(["export", "--layout", "trident", "--features", str(store), "--out", str(out)]) == 0
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["slide_a", "slide_b"], "label": [1, 0]}).to_csv(labels, index=False)
    with h5py.File(out / "patches" / "slide_a_patches.h5", "r") as h5:
        step = int(h5["coords"].attrs["patch_size_level0"])
    dataset = TridentWSIDataset(base_path=f"{out}/", labels_path=str(labels), feature_extractor="resnet18",
                                patch_size=step, wsi_name_col="slide_id", wsi_label_col="label", load_at_init=False,
                                bag_keys=["X", "Y", "adj", "coords"])
    bag = dataset[0]
    assert bag["X"].shape == (16, 8) and int(bag["Y"]) == 1
    edges = bag["adj"].coalesce().indices()
    assert edges.shape[1] > 0
    # A 4 x 4 grid with 8-neighbourhoods: 4 corners x 3 + 8 edge cells x 5 + 4 inner x 8 = 84 directed edges.
    assert int((edges[0] != edges[1]).sum()) == 84
    assert torchmil is not None


def test_geometry_from_patches_file_or_option(store, tmp_path):
    clam = tmp_path / "clam_native" / "h5_files"
    clam.mkdir(parents=True)
    with h5py.File(clam / "slide_a.h5", "w") as h5:  # as CLAM's extraction writes it: no coords attributes
        h5["features"], h5["coords"] = np.zeros((4, 8), np.float32), grid(2, 2)
    with pytest.raises(InputError, match="--patch_size_level0"):
        level0_patch_size(clam / "slide_a.h5")
    assert level0_patch_size(clam / "slide_a.h5", 128) == 128
    # A TRIDENT job whose features file lost its attributes: the patches file beside it still knows.
    assert features_main(["export", "--layout", "trident", "--features", str(store), "--out",
                          str(tmp_path / "t")]) == 0
    features_file = tmp_path / "t" / "features_resnet18" / "slide_a.h5"
    with h5py.File(features_file, "a") as h5:
        for key in list(h5["coords"].attrs):
            del h5["coords"].attrs[key]
    assert level0_patch_size(features_file) == PATCH
    with pytest.raises(InputError, match="patch_size_level0=64"):
        level0_patch_size(features_file, 128)  # a contradicting option is refused, not obeyed


@pytest.fixture
def slide_run(tmp_path):
    """A tiny slide, a CLAM folder for it without geometry, a TRIDENT export of it, scores and an annotation."""
    write_tiny_slide(tmp_path / "slides" / "slide_a.tiff", width=1024, height=768)
    coords = grid(8, 6, 256, 192)
    tumor = (coords[:, 0] < 256 + 3 * PATCH) & (coords[:, 1] < 192 + 3 * PATCH)
    features = np.random.default_rng(0).normal(size=(len(coords), 8))
    write_bag(tmp_path / "store" / "slide_a.h5", features, coords, patch_size_level0=PATCH)
    clam = tmp_path / "clam" / "h5_files"
    clam.mkdir(parents=True)
    with h5py.File(clam / "slide_a.h5", "w") as h5:
        h5["features"], h5["coords"] = features.astype(np.float32), coords
    assert features_main(["export", "--layout", "trident", "--features", str(tmp_path / "store"), "--out",
                          str(tmp_path / "trident")]) == 0
    write_patch_scores(tmp_path / "run" / "patch_scores" / "slide_a.h5", coords, np.where(tumor, 3.0, -3.0))
    x0, y0 = 256, 192
    asap_xml(tmp_path / "ann" / "slide_a.xml", {"Tumor": [[(x0, y0), (x0 + 3 * PATCH, y0), (x0 + 3 * PATCH,
                                                                                          y0 + 3 * PATCH),
                                                            (x0, y0 + 3 * PATCH)]]})
    pd.DataFrame({"slide_id": ["slide_a"], "label": [1], "score": [0.9], "split": ["test"]}).to_csv(
        tmp_path / "run" / "predictions_test.csv", index=False)
    return tmp_path


def test_heatmap_and_patch_evaluation_read_clam_and_trident_folders(slide_run, capsys):
    root = slide_run
    heat = ["heatmap", "--run", str(root / "run"), "--slides", str(root / "slides"), "--out", str(root / "heat"),
            "--thumbnail_size", "256", "--features"]
    assert mil_main(heat + [str(root / "clam")]) == 2
    assert "--patch_size_level0" in capsys.readouterr().err  # the error names the option that fixes it
    assert mil_main(heat + [str(root / "clam"), "--patch_size_level0", str(PATCH)]) == 0
    assert (root / "heat" / "slide_a_instance.png").is_file()
    assert mil_main(heat + [str(root / "trident"), "--overwrite", "true"]) == 0
    for folder, extra in (("trident", []), ("clam", ["--patch_size_level0", str(PATCH)])):
        argv = ["evaluate", "--run", str(root / "run"), "--annotations", str(root / "ann"), "--n_bootstrap", "0",
                "--features", str(root / folder), *extra]
        assert mil_main(argv) == 0, folder
        patch = json.loads((root / "run" / "metrics.json").read_text())["patch"]
        assert patch["n_tumor_patches"] == 9 and patch["pooled_auc"] == 1.0, folder


def test_finetune_geometry_from_clam_and_trident_matches_the_store(slide_run):
    from features.patches import read_patch
    from features.slides import list_slides, open_slide
    from features.training.patch_data import coords_file

    root = slide_run
    ref = list_slides(root / "slides")[0]
    ours = patch_geometry(root / "store" / "slide_a.h5", ref)
    trident = patch_geometry(coords_file(root / "trident", "slide_a"), ref)
    clam = patch_geometry(coords_file(root / "clam", "slide_a"), ref, PATCH)
    assert trident == ours
    assert (clam.patch_size_level0, clam.patch_level, clam.mpp_level0) == (PATCH, 0, 0.5)
    slide = open_slide(ref.path)
    try:
        pixels = [np.asarray(read_patch(slide, 320, 256, g)) for g in (ours, clam)]
    finally:
        slide.close()
    np.testing.assert_array_equal(pixels[0], pixels[1])  # the same patch pixels as at extraction


def test_torchmil_reads_our_store_with_its_grid(store):
    pytest.importorskip("torchmil")  # skipped only when torchmil is not installed
    from torchmil.datasets import ProcessedMILDataset

    labels = {"slide_a": 1, "slide_b": 0}

    def read(path: str, key: str) -> np.ndarray:
        if key == "labels":
            return np.array(labels[Path(path).stem])
        with h5py.File(path, "r") as h5:
            return h5[{"coords": "grid"}.get(key, key)][:]

    dataset = ProcessedMILDataset(features_path=str(store), labels_path=str(store), coords_path=str(store),
                                  bag_keys=["X", "Y", "adj", "coords"], file_ext=".h5", read_file_fn=read)
    bag = dataset[1]  # slide_b: a 3 x 3 grid
    assert bag["X"].shape == (9, 8) and int(bag["Y"]) == 0
    edges = bag["adj"].coalesce().indices()
    assert int((edges[0] != edges[1]).sum()) == 4 * 3 + 4 * 5 + 8  # corners, edge cells, the centre


def test_finetune_runs_from_a_clam_folder(slide_run):
    from features.selection import write_selection
    from features.training import finetune

    root = slide_run
    coords = grid(8, 6, 256, 192)
    picks = [0, 1, 9, 40, 41, 47]
    kinds = ["positive", "positive", "positive", "hard_negative", "hard_negative", "negative"]
    write_selection(root / "selection.csv", pd.DataFrame({
        "slide_id": "slide_a", "x": coords[picks, 0], "y": coords[picks, 1],
        "pseudo_label": [int(k == "positive") for k in kinds], "score": 0.5, "kind": kinds}))
    argv = ["--slides", str(root / "slides"), "--coords", str(root / "clam"), "--selection", str(root / "selection.csv"),
            "--data.batch_size", "4", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--data.num_workers", "0", "--encoder.name", "resnet10t"]
    with pytest.raises(InputError, match="--patch_size_level0"):
        finetune.main(argv + ["--out", str(root / "ft.safetensors")])
    finetune.main(argv + ["--patch_size_level0", str(PATCH), "--out", str(root / "ft.safetensors")])
    sidecar = json.loads((root / "ft.safetensors.json").read_text())
    assert sidecar["steps"] == 1 and sidecar["settings"]["patch_size_level0"] == PATCH
