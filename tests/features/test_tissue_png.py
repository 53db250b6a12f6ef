"""Tissue inspection PNGs show the patch grid that was kept, at a size where single patches are visible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fixtures import write_tiny_slide
from PIL import Image

from features.slides import open_slide
from features.tissue import GRID, detect_tissue, save_tissue_pngs


def test_tissue_png_draws_each_kept_patch(tmp_path: Path) -> None:
    slide = open_slide(write_tiny_slide(tmp_path / "s.tiff", width=1024, height=768))
    mask = detect_tissue(slide, 0.5)
    coords = np.array([[256, 192], [512, 384]])
    png = save_tissue_pngs(slide, mask, tmp_path / "thumbs", "s", coords, patch_size_level0=128)
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[:2] == (768, 1024)  # level 0 is smaller than the thumbnail cap: 1 px per level-0 px
    grid = np.all(image == GRID, axis=-1)
    for x, y in coords:
        assert grid[y, x:x + 128].all() and grid[y + 127, x:x + 128].all()  # top and bottom edges
        assert grid[y:y + 128, x].all() and grid[y:y + 128, x + 127].all()  # left and right edges
        assert not grid[y + 2:y + 126, x + 2:x + 126].any()  # the patch itself stays visible
    assert grid.sum() == 2 * 4 * 127
    bare = save_tissue_pngs(slide, mask, tmp_path / "bare", "s")
    assert not np.all(np.asarray(Image.open(bare).convert("RGB")) == GRID, axis=-1).any()
