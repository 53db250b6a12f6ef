"""One synthetic slide: layout, then stroma, cytoplasm, halos and nuclei painted in that order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.synth import cells
from features.synth.layout import LOOKALIKE, NORMAL, TUMOR, Layout, place_regions, region_map, split_area, tissue_field
from features.synth.texture import EOSIN, WHITE, paint, smooth_field, stamp


@dataclass(frozen=True)
class SlideSpec:
    """Everything that decides one slide's pixels; the same spec always renders the same image."""

    slide_id: str
    tumor: bool
    width: int  # level-0 pixels
    height: int
    mpp: float
    seed: int
    site: int = 0
    coverage: tuple[float, float] = (0.3, 0.6)
    tumor_area: tuple[float, float] = (0.02, 0.06)  # fraction of tissue
    lookalike_area: tuple[float, float] = (0.015, 0.04)
    tumor_lookalike_area: tuple[float, float] | None = None  # on tumor slides; None: as ``lookalike_area``
    lookalike_mimicry: float = 0.0  # 0: the standard look-alike; 1: tumor's colour, size and density
    site_cast: float = 1.0  # scales the site's colour cast (0: none)


def plan_layout(spec: SlideSpec, rng: np.random.Generator) -> Layout:
    """Tissue, then tumor regions (tumor slides only), then look-alikes away from tumor."""
    shape = (spec.height, spec.width)
    tissue = tissue_field(rng, shape, rng.uniform(*spec.coverage), n_blobs=int(rng.integers(1, 4)))
    area = float((tissue > 0.5).sum())
    tumor = []
    if spec.tumor:
        if rng.uniform() < 0.25:  # a single tiny focus: the hard case for any slide classifier
            areas = [area * rng.uniform(0.003, 0.006)]
        else:
            areas = split_area(rng, area * rng.uniform(*spec.tumor_area), int(rng.integers(1, 5)))
        tumor = place_regions(rng, tissue, areas, avoid=[], wobble=0.3)
    share = spec.tumor_lookalike_area if spec.tumor and spec.tumor_lookalike_area else spec.lookalike_area
    look_areas = split_area(rng, area * rng.uniform(*share), int(rng.integers(1, 4)))
    lookalike = place_regions(rng, tissue, look_areas, avoid=tumor, wobble=0.2)
    return Layout(tissue=tissue, tumor=tumor, lookalike=lookalike)


def site_tint(site: int, cast: float = 1.0) -> np.ndarray:
    """A per-site multiplicative colour shift: scanners and staining differ between hospitals.

    ``cast`` scales each shift's distance from no shift, so a cohort can make sites differ more (a stress test
    for anything that learns tumor from patches of one site)."""
    shifts = np.array([[1.0, 1.0, 1.0], [1.03, 0.96, 0.98], [0.97, 1.0, 1.04], [1.02, 1.02, 0.95]], dtype=np.float32)
    shift = shifts[site % len(shifts)]
    return shift if cast == 1 else (1 + cast * (shift - 1)).astype(np.float32)  # cast 1: the casts as they were


def render_slide(spec: SlideSpec) -> tuple[np.ndarray, Layout]:
    """(H, W, 3) uint8 RGB image and the layout it was drawn from."""
    rng = np.random.default_rng(spec.seed)
    layout = plan_layout(spec, rng)
    shape = (spec.height, spec.width)
    px = 1.0 / spec.mpp
    regions = region_map(shape, layout)
    image = np.empty((*shape, 3), dtype=np.float32)
    image[:] = WHITE
    paint_stroma(image, layout.tissue, smooth_field(rng, shape, 80 * px))
    tumorish = ((regions == TUMOR) | (regions == LOOKALIKE)).astype(np.float32)
    paint(image, 0.85 * tumorish, cells.CYTOPLASM_COLOR)

    normal = regions == NORMAL
    look_nuclei, halos = cells.lookalike_cells(rng, regions == LOOKALIKE, spec.mpp,
                                                   spec.lookalike_mimicry)
    layers = [
        (stamp(shape, halos, rng), cells.HALO_COLOR),
        (stamp(shape, cells.spindles(rng, normal, spec.mpp), rng), cells.SPINDLE_COLOR),
        (stamp(shape, cells.lymphocytes(rng, normal, spec.mpp), rng), cells.LYMPHOCYTE_COLOR),
        (stamp(shape, cells.tumor_cells(rng, regions == TUMOR, spec.mpp), rng), cells.TUMOR_COLOR),
        (stamp(shape, look_nuclei, rng), cells.lookalike_color(spec.lookalike_mimicry)),
    ]
    for opacity, color in layers:
        paint(image, opacity, color)
    noise = 2.5 * rng.standard_normal(shape, dtype=np.float32)
    for channel, tint in enumerate(site_tint(spec.site, spec.site_cast)):
        plane = image[..., channel]
        plane *= tint
        plane += noise
    return np.clip(image, 0, 255, out=image).astype(np.uint8), layout


def paint_stroma(image: np.ndarray, tissue: np.ndarray, field: np.ndarray) -> None:
    """Eosin-pink stroma whose shade drifts with ``field``, blended in by the tissue opacity."""
    for channel, weight in enumerate((4.0, 10.0, 6.0)):
        plane = image[..., channel]
        plane += tissue * (EOSIN[channel] + weight * field - plane)
