"""Where the tissue is: a boolean mask computed on a low-resolution image of the slide.

H&E tissue is coloured and glass is grey-white, so the mask thresholds saturation (Otsu's threshold, never below
a floor so that a blank slide stays blank), then cleans it with morphology whose sizes are given in microns and
converted per slide, so the same config works at any scan resolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import filters, morphology

from features.errors import InputError
from features.store import atomic_path

log = logging.getLogger(__name__)


@dataclass
class TissueConfig:
    """Tissue-detection settings; sizes in microns so they mean the same at 0.25 and 0.5 mpp."""

    mask_mpp: float = 8.0
    """Resolution of the mask image; 8 µm/px keeps a 100k-px slide's mask ~1k px wide."""
    min_saturation: float = 0.05
    """Floor on the threshold: glass never counts as tissue."""
    use_otsu: bool = True
    """Adapt the threshold to each slide's staining."""
    max_brightness: float = 0.96
    """Near-white pixels are background whatever their saturation."""
    close_um: float = 32.0
    """Bridge small gaps inside tissue."""
    open_um: float = 16.0
    """Drop dust and thin debris."""
    min_area_um2: float = 40_000.0
    """Drop islands smaller than ~0.2 x 0.2 mm."""
    fill_holes: bool = True
    """Holes (fat, vessels) smaller than min_area count as tissue."""


@dataclass
class TissueMask:
    """A low-resolution tissue mask and its scale relative to level 0."""

    mask: np.ndarray
    downsample: float

    def __post_init__(self) -> None:
        # A summed-area table answers "how much tissue under this square" for any number of patches in O(1) each.
        padded = np.pad(self.mask.astype(np.int64), ((1, 0), (1, 0)))
        self._integral = padded.cumsum(0).cumsum(1)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction(self, coords: np.ndarray, size_level0: int) -> np.ndarray:
        """Tissue fraction of each level-0 square (top-left ``coords``, side ``size_level0``)."""
        if len(coords) == 0:
            return np.zeros(0)
        h, w = self.mask.shape
        x0 = np.clip(np.floor(coords[:, 0] / self.downsample), 0, w).astype(np.int64)
        y0 = np.clip(np.floor(coords[:, 1] / self.downsample), 0, h).astype(np.int64)
        x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / self.downsample), 0, w).astype(np.int64)
        y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / self.downsample), 0, h).astype(np.int64)
        table = self._integral
        inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        return inside / area


def low_resolution_image(slide: openslide.OpenSlide, mpp_level0: float, mask_mpp: float) -> tuple[np.ndarray, float]:
    """RGB image of the whole slide near ``mask_mpp``, and its downsample from level 0."""
    width, height = slide.dimensions
    scale = max(mask_mpp / mpp_level0, 1.0)
    size = (max(1, round(width / scale)), max(1, round(height / scale)))
    try:
        thumbnail = slide.get_thumbnail(size).convert("RGB")
    except openslide.OpenSlideError as error:
        name = getattr(slide, "_filename", "slide")
        raise InputError(f"{name}: reading the slide for tissue detection failed ({error}); the file is damaged: "
                         "re-export it or pass --skip_errors") from None
    return np.asarray(thumbnail), width / thumbnail.width


def detect_tissue(slide: openslide.OpenSlide, mpp_level0: float, config: TissueConfig | None = None) -> TissueMask:
    """Tissue mask of a slide at about ``config.mask_mpp`` microns per pixel."""
    config = config or TissueConfig()
    image, downsample = low_resolution_image(slide, mpp_level0, config.mask_mpp)
    return TissueMask(mask_from_rgb(image, downsample * mpp_level0, config), downsample)


def mask_from_rgb(image: np.ndarray, mpp: float, config: TissueConfig) -> np.ndarray:
    """Saturation threshold + morphology on an RGB image whose pixels are ``mpp`` microns wide."""
    rgb = image.astype(np.float32) / 255.0
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    threshold = config.min_saturation
    if config.use_otsu and np.ptp(saturation) > 1e-3:
        threshold = max(threshold, float(filters.threshold_otsu(saturation)))
    mask = (saturation > threshold) & ~((high > config.max_brightness) & (saturation < 2 * threshold))
    radius = lambda microns: max(0, round(microns / mpp / 2))  # noqa: E731 - diameter in µm -> radius in px
    if radius(config.close_um):
        mask = morphology.closing(mask, morphology.disk(radius(config.close_um)))
    if radius(config.open_um):
        mask = morphology.opening(mask, morphology.disk(radius(config.open_um)))
    min_pixels = max(1, round(config.min_area_um2 / mpp**2))
    if config.fill_holes:
        mask = morphology.remove_small_holes(mask, max_size=min_pixels)
    labels, count = ndimage.label(mask)
    if count:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    return mask.astype(bool)


THUMBNAIL_SIDE = 1024  # inspection PNGs: large enough to see single patches, small enough to browse quickly
TISSUE_EDGE, GRID = (0, 160, 0), (255, 200, 0)


def save_tissue_pngs(slide: openslide.OpenSlide, mask: TissueMask, out_dir: str | Path, slide_id: str,
                     coords: np.ndarray | None = None, patch_size_level0: int = 0) -> Path:
    """Thumbnail with the tissue outlined in green and every kept patch drawn in yellow: what was tiled, at a
    glance. Also the bare mask, at mask resolution."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width0, height0 = slide.dimensions
    side = max(max(mask.mask.shape), min(THUMBNAIL_SIDE, max(width0, height0)))
    w, h = max(1, round(width0 * side / max(width0, height0))), max(1, round(height0 * side / max(width0, height0)))
    thumbnail = np.asarray(slide.get_thumbnail((w, h)).convert("RGB").resize((w, h)))
    tissue = np.asarray(Image.fromarray(mask.mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    edge = tissue ^ ndimage.binary_erosion(tissue, iterations=max(1, min(h, w) // 200))
    overlay = thumbnail.copy()
    overlay[edge] = TISSUE_EDGE
    image = Image.fromarray(overlay)
    if coords is not None and len(coords) and patch_size_level0 > 0:
        draw, scale = ImageDraw.Draw(image), w / width0
        for x, y in np.asarray(coords, dtype=np.float64):
            draw.rectangle([x * scale, y * scale, (x + patch_size_level0) * scale - 1,
                            (y + patch_size_level0) * scale - 1], outline=GRID, width=1)
    path = out_dir / f"{slide_id}_tissue.png"
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    with atomic_path(out_dir / f"{slide_id}_mask.png") as tmp:
        Image.fromarray((mask.mask * 255).astype(np.uint8)).save(tmp, format="PNG")
    return path
