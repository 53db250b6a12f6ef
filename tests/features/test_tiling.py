"""Tissue masks, grids at a target mpp, and patch reading on real tiny pyramidal slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.errors import InputError
from features.patches import PatchDataset, items_for_slide, read_patch
from features.slides import SlideRef, open_slide
from features.tiling import Geometry, TilingConfig, grid_coords, tile_slide
from features.tissue import TissueConfig, TissueMask, detect_tissue, save_tissue_pngs
from fixtures import REAL_SLIDES, write_tiny_slide


def _tile(path: Path, **tiling: float) -> tuple[np.ndarray, Geometry, TissueMask]:
    return tile_slide(open_slide(path), SlideRef(path.stem, path), TissueConfig(), TilingConfig(**tiling))


def test_grid_covers_the_tissue_block_and_nothing_else(tmp_path: Path) -> None:
    path = write_tiny_slide(tmp_path / "s.tiff", 2048, 1536, boxes=[(512, 384, 1536, 1152)])
    coords, geometry, mask = _tile(path, target_mpp=0.5, patch_size=128, min_tissue=0.5)
    assert len(coords) == (1024 // 128) * (768 // 128)
    assert coords[:, 0].min() == 512 and coords[:, 1].min() == 384
    assert (coords[:, 0] + 128).max() == 1536 and (coords[:, 1] + 128).max() == 1152
    assert abs(mask.tissue_fraction - 0.25) < 0.02
    assert coords.dtype == np.int64 and geometry.mpp_source == "metadata"


def test_scans_at_025_and_05_mpp_give_the_same_field_of_view(tmp_path: Path) -> None:
    half = write_tiny_slide(tmp_path / "half.tiff", 2048, 1536, mpp=0.5, boxes=[(512, 384, 1536, 1152)])
    quarter = write_tiny_slide(tmp_path / "quarter.tiff", 4096, 3072, mpp=0.25, boxes=[(1024, 768, 3072, 2304)])
    c_half, g_half, _ = _tile(half, target_mpp=0.5, patch_size=128)
    c_quarter, g_quarter, _ = _tile(quarter, target_mpp=0.5, patch_size=128)
    assert g_quarter.patch_size_level0 == 2 * g_half.patch_size_level0 == 256
    assert g_quarter.patch_level == 1 and g_quarter.read_size == 128  # read from the 0.5 mpp level, no resize
    np.testing.assert_array_equal(c_quarter, 2 * c_half)
    patch_half = np.asarray(read_patch(open_slide(half), *c_half[5], g_half), dtype=float)
    patch_quarter = np.asarray(read_patch(open_slide(quarter), *c_quarter[5], g_quarter), dtype=float)
    assert patch_half.shape == patch_quarter.shape == (128, 128, 3)
    assert abs(patch_half.mean() - patch_quarter.mean()) < 8


def test_overlap_and_min_tissue(tmp_path: Path) -> None:
    path = write_tiny_slide(tmp_path / "s.tiff", 1024, 768, boxes=[(256, 192, 768, 576)])
    plain, _, _ = _tile(path, patch_size=128, min_tissue=0.5)
    overlapping, geometry, _ = _tile(path, patch_size=128, overlap=64, min_tissue=0.5)
    assert geometry.stride_level0 == 64 and len(overlapping) > 2 * len(plain)
    everything, _, _ = _tile(path, patch_size=128, min_tissue=0.0)
    assert len(everything) == (1024 // 128) * (768 // 128)
    with pytest.raises(InputError, match="overlap"):
        _tile(path, patch_size=128, overlap=128)


def test_blank_slide_gives_no_patches(tmp_path: Path) -> None:
    coords, _, mask = _tile(write_tiny_slide(tmp_path / "blank.tiff", boxes=[]))
    assert len(coords) == 0 and not mask.mask.any()


def test_geometry_round_trips_through_attrs(tmp_path: Path) -> None:
    _, geometry, _ = _tile(write_tiny_slide(tmp_path / "s.tiff"), patch_size=64)
    assert Geometry.from_attrs(geometry.to_attrs()) == geometry
    with pytest.raises(InputError, match="lack"):
        Geometry.from_attrs({"patch_size": 64})


def test_patch_dataset_reads_real_vendor_slides_and_fails_clearly_on_broken_ones() -> None:
    svs = REAL_SLIDES / "small.svs"
    slide = open_slide(svs)
    mask = TissueMask(np.ones((4, 4), bool), downsample=4.0)
    geometry = Geometry(8, 8, 0, 1.0, 0.499, 0.499, "metadata", 16, 16, 0)
    coords = grid_coords(geometry, mask, 0.5)
    assert len(coords) == 4
    dataset = PatchDataset(items_for_slide(svs, coords, geometry), transform=np.asarray)
    image, index = dataset[3]
    assert image.shape == (8, 8, 3) and index == 3
    assert detect_tissue(slide, 0.499).mask.shape[0] >= 1
    broken = PatchDataset(items_for_slide(REAL_SLIDES / "unreadable.svs", coords, geometry))
    with pytest.raises(InputError, match="unreadable.svs: reading pixels failed"):
        broken[0]


def test_tissue_pngs_are_written(tmp_path: Path) -> None:
    path = write_tiny_slide(tmp_path / "s.tiff")
    slide = open_slide(path)
    mask = detect_tissue(slide, 0.5)
    png = save_tissue_pngs(slide, mask, tmp_path / "thumbs", "s")
    assert png.is_file() and (tmp_path / "thumbs" / "s_mask.png").is_file()


def test_tissue_detection_on_a_damaged_slide_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="unreadable.svs: reading the slide for tissue detection failed"):
        detect_tissue(open_slide(REAL_SLIDES / "unreadable.svs"), 0.499)
