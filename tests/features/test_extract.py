"""`features tile` / `features extract` on real tiny slides and on OpenSlide's vendor fixtures."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from features.__main__ import main as features_main
from features.encoders import EncoderConfig, build_encoder
from features.errors import InputError
from features.extraction.cli import extract, tile
from features.patches import read_patch
from features.slides import open_slide
from features.store import COORD_ATTRS, FEATURE_ATTRS, read_bag, read_coords
from features.tiling import Geometry
from fixtures import REAL_SLIDES, dead_pid, write_tiny_slide

torch.set_num_threads(1)
ENCODER = ["--encoder.name", "resnet10t", "--encoder.seed", "3"]
TAG = "resnet10t-random-seed3"
FAST = ["--patch_size", "64", "--batch_size", "16", "--num_workers", "0", *ENCODER]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two scans of the same layout at 0.5 and 0.25 mpp, and a blank slide; extracted once with a worker."""
    root = tmp_path_factory.mktemp("cohort")
    write_tiny_slide(root / "slides" / "half.tiff", width=1024, height=768, mpp=0.5, seed=1)
    write_tiny_slide(root / "slides" / "quarter.tiff", width=2048, height=1536, mpp=0.25, seed=2)
    write_tiny_slide(root / "slides" / "blank.tiff", boxes=[])
    out = root / "out"
    extract(["--slides", str(root / "slides"), "--out", str(out), *FAST, "--num_workers", "1"])
    return root, out


def test_layout_attrs_and_manifest(cohort):
    root, out = cohort
    assert sorted(p.name for p in (out / "features" / TAG).iterdir()) == ["blank.h5", "half.h5", "quarter.h5",
                                                                          "settings.json"]
    assert (out / "coords" / "half.h5").is_file() and (out / "thumbnails" / "half_tissue.png").is_file()
    bag = read_bag(out / "features" / TAG / "half.h5")
    assert set(COORD_ATTRS) <= set(bag.coord_attrs) and set(FEATURE_ATTRS) <= set(bag.feature_attrs)
    assert bag.feature_attrs["encoder"] == "resnet10t" and bag.feature_attrs["weights_sha256"] == ""
    assert bag.feature_attrs["dtype"] == "float32" and bag.features.shape == (len(bag.coords), 512)
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert manifest.loc["half", "status"] == "ok" and manifest.loc["half", "n_patches"] == len(bag.coords)
    assert manifest.loc["blank", "status"] == "empty" and manifest.loc["blank", "n_patches"] == 0
    blank = read_bag(out / "features" / TAG / "blank.h5")
    assert blank.features.shape == (0, 512) and blank.coords.shape == (0, 2)


def test_coords_lie_in_tissue_and_rows_match_direct_embedding(cohort):
    root, out = cohort
    bag = read_bag(out / "features" / TAG / "half.h5")
    size = bag.coord_attrs["patch_size_level0"]
    assert size == 64 and len(bag.coords) > 20
    # Tissue is the box (256, 192)-(768, 576); a patch may overhang it by less than 1 - min_tissue.
    centres = bag.coords + size / 2
    assert (centres[:, 0] > 256).all() and (centres[:, 0] < 768).all()
    assert (centres[:, 1] > 192).all() and (centres[:, 1] < 576).all()
    encoder = build_encoder(EncoderConfig(name="resnet10t", seed=3), patch_size=64)
    slide = open_slide(root / "slides" / "half.tiff")
    geometry = Geometry.from_attrs(bag.coord_attrs)
    rows = [0, len(bag.coords) // 2, len(bag.coords) - 1]
    images = torch.stack([encoder.transform(read_patch(slide, *bag.coords[i], geometry)) for i in rows])
    with torch.inference_mode():
        direct = encoder.model(images).numpy()
    np.testing.assert_allclose(bag.features[rows], direct, rtol=1e-4, atol=1e-4)


def test_two_scan_resolutions_give_the_same_grid_at_the_target_mpp(cohort):
    _, out = cohort
    half, quarter = (read_bag(out / "features" / TAG / f"{s}.h5") for s in ("half", "quarter"))
    assert quarter.coord_attrs["patch_size_level0"] == 2 * half.coord_attrs["patch_size_level0"] == 128
    assert quarter.coord_attrs["patch_level"] == 1 and half.coord_attrs["patch_level"] == 0
    np.testing.assert_array_equal(quarter.coords, 2 * half.coords)
    assert quarter.coord_attrs["target_mpp"] == half.coord_attrs["target_mpp"] == 0.5


def test_rerun_skips_complete_files_and_cleans_temporaries(cohort, capsys):
    root, out = cohort
    done = out / "features" / TAG / "half.h5"
    before = done.stat().st_mtime_ns
    stale = done.with_name(f"half.h5.tmp-{dead_pid()}-deadbeef")
    stale.write_bytes(b"partial")
    extract(["--slides", str(root / "slides"), "--out", str(out), *FAST])
    assert done.stat().st_mtime_ns == before and not stale.exists()
    assert "3 already done" in capsys.readouterr().out


def test_tile_writes_coords_only_and_extract_reuses_them(tmp_path):
    write_tiny_slide(tmp_path / "slides" / "a.tiff", seed=4)
    tile(["--slides", str(tmp_path / "slides"), "--out", str(tmp_path / "out"), "--patch_size", "64"])
    coords, attrs = read_coords(tmp_path / "out" / "coords" / "a.h5")
    assert len(coords) and attrs["patch_size"] == 64
    with h5py.File(tmp_path / "out" / "coords" / "a.h5") as h5:
        assert "features" not in h5
    with pytest.raises(InputError, match="--patch_size 96 .stored: 64.*--overwrite true"):  # never mixed in
        extract(["--slides", str(tmp_path / "slides"), "--out", str(tmp_path / "out"), *FAST, "--patch_size", "96"])
    extract(["--slides", str(tmp_path / "slides"), "--out", str(tmp_path / "out"), *FAST])
    np.testing.assert_array_equal(read_bag(tmp_path / "out" / "features" / TAG / "a.h5").coords, coords)


def test_given_coordinates_csv_tta_views_and_float16(tmp_path):
    write_tiny_slide(tmp_path / "slides" / "a.tiff", seed=5)
    points = pd.DataFrame({"slide_id": ["a"] * 5, "x": [300, 340, 380, 420, 460], "y": [200, 260, 300, 340, 380]})
    points.to_csv(tmp_path / "points.csv", index=False)
    common = ["--slides", str(tmp_path / "slides"), "--coords", str(tmp_path / "points.csv"), *FAST]
    extract([*common, "--out", str(tmp_path / "o1"), "--tta", "d4", "--views", "2", "--batch_size", "2"])
    extract([*common, "--out", str(tmp_path / "o2"), "--tta", "d4", "--views", "2", "--batch_size", "5",
             "--dtype", "float16"])
    one = read_bag(tmp_path / "o1" / "features" / TAG / "a.h5", with_views=True)
    two = read_bag(tmp_path / "o2" / "features" / TAG / "a.h5", with_views=True)
    np.testing.assert_array_equal(one.coords, points[["x", "y"]].to_numpy())
    assert one.views.shape == (2, 5, 512) and two.features.dtype == np.float16
    # Views are drawn per patch row from the seed: the batch size does not change them.
    np.testing.assert_allclose(two.views.astype(np.float32), one.views, rtol=1e-2, atol=1e-2)
    assert not np.allclose(one.views[0], one.views[1], atol=1e-3)
    # D4 TTA is the mean over the 8 symmetries, so it is invariant to a quarter turn of the patch.
    encoder = build_encoder(EncoderConfig(name="resnet10t", seed=3), patch_size=64)
    geometry = Geometry.from_attrs(one.coord_attrs)
    image = encoder.transform(read_patch(open_slide(tmp_path / "slides" / "a.tiff"), 300, 200, geometry))[None]
    from features.extraction.views import tta_d4

    with torch.inference_mode():
        turned = tta_d4(encoder.model, torch.rot90(image, 1, dims=(-2, -1))).numpy()
    np.testing.assert_allclose(one.features[0], turned[0], rtol=1e-3, atol=1e-4)
    assert one.feature_attrs["tta"] == "d4" and one.feature_attrs["n_views"] == 2


@pytest.fixture(scope="module")
def vendor(tmp_path_factory):
    """OpenSlide's own fixtures: SVS, generic TIFF with a nonsense mpp (overridden in the CSV), DICOM, bad files."""
    root = tmp_path_factory.mktemp("vendor")
    for name in ("small.svs", "boxes.tiff", "unopenable.tiff", "unreadable.svs"):
        shutil.copy(REAL_SLIDES / name, root / name)
    (root / "dicom").mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(REAL_SLIDES / name, root / "dicom" / name)
    rows = ["slide_id,path,mpp", "small,small.svs,", "boxes,boxes.tiff,0.5", "dicom,dicom/boxes_0.dcm,",
            "unopenable,unopenable.tiff,", "unreadable,unreadable.svs,"]
    (root / "slides.csv").write_text("\n".join(rows) + "\n")
    return root


VENDOR = ["--patch_size", "8", "--mpp", "0.5", "--min_tissue", "0", "--batch_size", "8", "--num_workers", "0",
          *ENCODER]


def test_vendor_formats_with_skip_errors(vendor):
    out = vendor / "out"
    assert features_main(["extract", "--slides", str(vendor / "slides.csv"), "--out", str(out), *VENDOR,
                          "--skip_errors"]) == 0
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert manifest["status"].to_dict() == {"boxes": "ok", "dicom": "ok", "small": "ok", "unopenable": "error",
                                            "unreadable": "error"}
    assert "unopenable.tiff" in manifest.loc["unopenable", "error"]
    assert "unreadable.svs" in manifest.loc["unreadable", "error"]
    boxes = read_bag(out / "features" / TAG / "boxes.h5")
    assert boxes.coord_attrs["mpp_source"].startswith("csv") and boxes.coord_attrs["mpp_level0"] == 0.5
    assert read_bag(out / "features" / TAG / "small.h5").coords.shape == (4, 2)  # 16x16 px at 0.499 mpp
    assert read_bag(out / "features" / TAG / "dicom.h5").coord_attrs["level0_width"] == 16


@pytest.mark.parametrize("name", ["unopenable", "unreadable"])
def test_a_bad_slide_stops_the_run_with_one_line(vendor, tmp_path, capsys, name):
    suffix = ".tiff" if name == "unopenable" else ".svs"
    (tmp_path / "slides.csv").write_text(f"slide_id,path\n{name},{vendor / (name + suffix)}\n")
    code = features_main(["extract", "--slides", str(tmp_path / "slides.csv"), "--out", str(tmp_path / "o"), *VENDOR])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{name}{suffix}" in err[0] and err[0].startswith("error: ")


def test_pixel_read_failure_in_a_worker_fails_that_slide_only(vendor, tmp_path):
    # Given coordinates skip tiling, so the damaged tiles are first touched by a DataLoader worker.
    points = "slide_id,x,y\nsmall,0,0\nsmall,8,8\nunreadable,0,0\nunreadable,8,8\n"
    (tmp_path / "points.csv").write_text(points)
    (tmp_path / "slides.csv").write_text(f"slide_id,path\nsmall,{vendor / 'small.svs'}\n"
                                         f"unreadable,{vendor / 'unreadable.svs'}\n")
    out = tmp_path / "o"
    extract(["--slides", str(tmp_path / "slides.csv"), "--coords", str(tmp_path / "points.csv"), "--out", str(out),
             *VENDOR, "--num_workers", "1", "--skip_errors"])
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert manifest.loc["small", "status"] == "ok" and manifest.loc["unreadable", "status"] == "error"
    assert "reading pixels failed" in manifest.loc["unreadable", "error"]
    assert not (out / "features" / TAG / "unreadable.h5").exists()
