"""Point-annotated images for mitosis-style detection, with a MIDOG++-style COCO file.

Every image is tumor tissue. Mitotic figures are irregular dark clumps of condensed chromatin (a ragged plate or
a cluster of small blobs) in a clear zone. Imposters ("not mitotic figure") come in kinds (``IMPOSTER_KINDS``),
each sharing some of a figure's cues and lacking others, as the look-alikes of real slides do:

- ``apoptotic``: one smooth, round, dark body in a hyper-eosinophilic (pink) rim (the only kind by default);
- ``pyknotic``: one small, very dark, smooth nucleus in a clear halo, so it shares the figure's clear zone;
- ``karyorrhexis``: a few smooth round nuclear fragments in a pale zone: a cluster of dark blobs, like prophase;
- ``lymphocytes``: a tight cluster of small dark round nuclei with no zone.

Random patches rarely land on an imposter, so a head trained on every negative sees mostly easy ones; the
``hard`` preset (``POINT_PRESETS``) mixes all kinds, more of them, to make that matter. Every figure is boxed,
as in MIDOG++, with a fixed physical size (``BOX_UM``) centred on it; category 1 is ``mitotic figure``,
2 ``not mitotic figure``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from features.errors import InputError
from features.store import atomic_path
from features.synth import cells
from features.synth.render import paint_stroma
from features.synth.texture import WHITE, Nuclei, paint, smooth_field, stamp
from features.synth.tiff import write_pyramidal_tiff

BOX_UM = 12.5  # MIDOG++ boxes are 50 px at 0.25 mpp
CATEGORIES = [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "not mitotic figure"}]
MITOSIS_COLOR = np.array([34.0, 18.0, 66.0], dtype=np.float32)
CLEAR_ZONE_COLOR = np.array([222.0, 205.0, 232.0], dtype=np.float32)
EOSINOPHILIC_COLOR = np.array([232.0, 120.0, 168.0], dtype=np.float32)
IMPOSTER_KINDS = ("apoptotic", "pyknotic", "karyorrhexis", "lymphocytes")


@dataclass(frozen=True)
class PointConfig:
    """Size and make-up of a point-annotated image set."""

    n_images: int = 12
    width: int = 1024
    height: int = 1024
    mpp: float = 0.25
    figures: tuple[int, int] = (3, 8)  # mitotic figures per image (min, max)
    imposters: tuple[int, int] = (3, 8)
    imposter_kinds: tuple[str, ...] = ("apoptotic",)  # drawn uniformly per imposter; see IMPOSTER_KINDS
    unlabeled_fraction: float = 0.25  # images written without annotations (split "unlabeled")
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    tile: int = 256
    quality: int = 90


POINT_PRESETS: dict[str, PointConfig] = {
    "demo": PointConfig(),
    "tiny": PointConfig(n_images=4, width=512, height=512),
    # Every imposter kind, about twice as many imposters as figures (as in MIDOG++), enough images for a
    # validation split that can tell regimes apart.
    "hard": PointConfig(n_images=40, width=768, height=768, figures=(3, 6), imposters=(6, 12),
                        imposter_kinds=IMPOSTER_KINDS),
}


def point_config(preset: str = "demo", **overrides) -> PointConfig:
    """A preset with the given fields replaced (None leaves a field as the preset has it)."""
    if preset not in POINT_PRESETS:
        raise InputError(f"--preset {preset!r}: unknown in points mode; choose one of {', '.join(POINT_PRESETS)}")
    config = replace(POINT_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    unknown = set(config.imposter_kinds) - set(IMPOSTER_KINDS)
    if unknown or not config.imposter_kinds:
        raise InputError(f"imposter_kinds {sorted(unknown)}: choose from {', '.join(IMPOSTER_KINDS)}")
    return config


@dataclass
class PointCohortPaths:
    root: Path
    images: Path
    coco_json: Path  # every image (split "unlabeled" ones without annotations)
    images_csv: Path  # every image: file_name, image_id, width, height, mpp, split


def _centres(rng: np.random.Generator, n: int, shape: tuple[int, int], margin: float, gap: float) -> np.ndarray:
    """Up to ``n`` random points at least ``margin`` from the border and ``gap`` from each other."""
    candidates = rng.uniform([margin, margin], [shape[1] - margin, shape[0] - margin], size=(20 * n, 2))
    chosen: list[np.ndarray] = []
    for point in candidates:  # at most a few dozen figures per image
        if all(np.hypot(*(point - other)) >= gap for other in chosen):
            chosen.append(point)
            if len(chosen) == n:
                break
    return np.array(chosen, dtype=np.float32).reshape(-1, 2)


def _blobs(rng: np.random.Generator, centres: np.ndarray, radius: np.ndarray, wobble: float,
           opacity: float, grain: float) -> Nuclei:
    n = len(centres)
    return Nuclei(xy=centres, a=radius.astype(np.float32), b=(radius * rng.uniform(0.8, 1.0, n)).astype(np.float32),
                  theta=rng.uniform(0, np.pi, n).astype(np.float32), wobble=np.full(n, wobble, np.float32),
                  rim=np.zeros(n, np.float32), nucleolus=np.zeros(n, np.float32),
                  opacity=np.full(n, opacity, np.float32), grain=grain)


def mitotic_parts(rng: np.random.Generator, centres: np.ndarray, px: float) -> Nuclei:
    """Each figure as 6-12 small chromatin clumps along a ragged plate or in a tight cluster."""
    parts = []
    for centre in centres:
        k = int(rng.integers(6, 13))
        if rng.uniform() < 0.6:  # metaphase-like plate
            angle = rng.uniform(0, np.pi)
            along = rng.uniform(-4.5, 4.5, k) * px
            across = rng.normal(0, 0.7, k) * px
            offsets = np.stack([along * np.cos(angle) - across * np.sin(angle),
                                along * np.sin(angle) + across * np.cos(angle)], axis=1)
        else:  # prophase-like clump
            offsets = rng.normal(0, 1.8, size=(k, 2)) * px
        parts.append(centre + offsets)
    xy = np.concatenate(parts) if parts else np.zeros((0, 2))
    return _blobs(rng, xy.astype(np.float32), rng.uniform(0.8, 1.5, len(xy)) * px, 0.35, 0.97, 0.2)


def imposter_kinds(rng: np.random.Generator, kinds: tuple[str, ...], n: int) -> np.ndarray:
    """The kind of each of ``n`` imposters; one kind draws no random numbers (older cohorts stay identical)."""
    if len(kinds) == 1:
        return np.full(n, kinds[0], dtype=object)
    return np.asarray(kinds, dtype=object)[rng.integers(len(kinds), size=n)]


def _clusters(rng: np.random.Generator, centres: np.ndarray, count: tuple[int, int], spread: float) -> np.ndarray:
    """``count`` (min, max) points around each centre, normally spread by ``spread`` pixels."""
    parts = [centre + rng.normal(0, spread, size=(int(rng.integers(count[0], count[1] + 1)), 2)) for centre in centres]
    return (np.concatenate(parts) if parts else np.zeros((0, 2))).astype(np.float32)


def paint_other_imposters(image: np.ndarray, rng: np.random.Generator, centres: np.ndarray, kinds: np.ndarray,
                          px: float) -> None:
    """Pyknotic nuclei, karyorrhexis and lymphocyte clusters: each shares some cue of a mitotic figure.

    Pyknotic nuclei share the clear zone, karyorrhectic fragments the cluster of dark blobs in a pale zone,
    lymphocytes the darkness and clustering; none has the ragged, granular chromatin clumps of a figure.
    """
    shape = image.shape[:2]
    pyknotic, fragmented, lymphoid = (centres[kinds == kind] for kind in ("pyknotic", "karyorrhexis", "lymphocytes"))
    halo_xy = np.concatenate([pyknotic, fragmented])
    halos = _blobs(rng, halo_xy, rng.uniform(4.5, 6.5, len(halo_xy)) * px, 0.1, 0.75, 0.0)
    paint(image, stamp(shape, halos, rng), CLEAR_ZONE_COLOR)
    shrunken = _blobs(rng, pyknotic, rng.uniform(1.8, 2.6, len(pyknotic)) * px, 0.05, 0.97, 0.05)
    fragment_xy = _clusters(rng, fragmented, (3, 6), 2.0 * px)
    fragments = _blobs(rng, fragment_xy, rng.uniform(1.0, 1.7, len(fragment_xy)) * px, 0.05, 0.95, 0.05)
    dark = stamp(shape, shrunken, rng)
    paint(image, stamp(shape, fragments, rng, canvas=dark), MITOSIS_COLOR)
    lymph_xy = _clusters(rng, lymphoid, (4, 8), 3.0 * px)
    lymph = _blobs(rng, lymph_xy, rng.uniform(2.0, 2.8, len(lymph_xy)) * px, 0.02, 0.9, 0.08)
    paint(image, stamp(shape, lymph, rng), cells.LYMPHOCYTE_COLOR)


def render_point_image(rng: np.random.Generator, config: PointConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image, mitosis centres (M, 2) and imposter centres (I, 2) in pixels."""
    shape = (config.height, config.width)
    px = 1.0 / config.mpp
    image = np.empty((*shape, 3), dtype=np.float32)
    image[:] = WHITE
    paint_stroma(image, np.ones(shape, np.float32), smooth_field(rng, shape, 80 * px))
    paint(image, np.full(shape, 0.85, np.float32), cells.CYTOPLASM_COLOR)
    n_fig = int(rng.integers(config.figures[0], config.figures[1] + 1))
    n_imp = int(rng.integers(config.imposters[0], config.imposters[1] + 1))
    centres = _centres(rng, n_fig + n_imp, shape, margin=BOX_UM * px, gap=2 * BOX_UM * px)
    figures, imposters = centres[:n_fig], centres[n_fig:]
    kinds = imposter_kinds(rng, config.imposter_kinds, len(imposters))
    background = cells.tumor_cells(rng, np.ones(shape, bool), config.mpp)
    near = np.min(np.hypot(*(background.xy[:, None] - centres[None]).transpose(2, 0, 1)), axis=1,
                  initial=np.inf) if len(centres) else np.full(len(background), np.inf)
    background = background.subset(near > 8 * px)  # room for the figure and its zone
    paint(image, stamp(shape, background, rng), cells.TUMOR_COLOR)
    zones = _blobs(rng, figures, np.full(len(figures), 6.5 * px), 0.15, 0.8, 0.0)
    apoptotic = imposters[kinds == "apoptotic"]
    rims = _blobs(rng, apoptotic, rng.uniform(5.0, 6.0, len(apoptotic)) * px, 0.1, 0.85, 0.0)
    paint(image, stamp(shape, zones, rng), CLEAR_ZONE_COLOR)
    paint(image, stamp(shape, rims, rng), EOSINOPHILIC_COLOR)
    bodies = _blobs(rng, apoptotic, rng.uniform(2.6, 3.6, len(apoptotic)) * px, 0.0, 0.95, 0.05)
    dark = stamp(shape, mitotic_parts(rng, figures, px), rng)
    paint(image, stamp(shape, bodies, rng, canvas=dark), MITOSIS_COLOR)
    if (kinds != "apoptotic").any():  # the default set draws nothing here, so its images stay as they were
        paint_other_imposters(image, rng, imposters, kinds, px)
    image += 2.5 * rng.standard_normal(shape, dtype=np.float32)[..., None]
    return np.clip(image, 0, 255, out=image).astype(np.uint8), figures, imposters


def _box(centre: np.ndarray, side: float, shape: tuple[int, int]) -> list[float]:
    x, y = float(centre[0]), float(centre[1])
    half = side / 2
    return [max(0.0, x - half), max(0.0, y - half), min(float(shape[1]), x + half), min(float(shape[0]), y + half)]


def plan_points(config: PointConfig) -> pd.DataFrame:
    """file_name, image_id, width, height, mpp, split and seed per image; deterministic for the seed."""
    if config.n_images < 1:
        raise InputError(f"--n_slides {config.n_images}: write at least one image")
    rng = np.random.default_rng([config.seed, 1])
    n = config.n_images
    n_unlabeled = int(round(n * config.unlabeled_fraction))
    n_labeled = n - n_unlabeled
    n_test = max(1, round(n_labeled * config.split[2])) if n_labeled >= 2 else 0
    n_val = max(1, round(n_labeled * config.split[1])) if n_labeled >= 3 else 0
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (n_labeled - n_test - n_val)
    splits = [splits[i] for i in rng.permutation(n_labeled)] + ["unlabeled"] * n_unlabeled
    return pd.DataFrame({
        "file_name": [f"image_{i:03d}.tiff" for i in range(n)], "image_id": np.arange(1, n + 1),
        "width": config.width, "height": config.height, "mpp": config.mpp, "split": splits,
        "seed": rng.integers(2**31, size=n),
    })


def write_point_cohort(out: str | Path, config: PointConfig = PointConfig(), progress: bool = True) -> PointCohortPaths:
    """Write images (skipping finished ones), ``annotations.json`` (COCO) and ``images.csv``."""
    root = Path(out)
    paths = PointCohortPaths(root, root / "images", root / "annotations.json", root / "images.csv")
    paths.images.mkdir(parents=True, exist_ok=True)
    plan = plan_points(config)
    coco = {"images": [], "categories": CATEGORIES, "annotations": [],
            "info": {"description": "hnm-mil synthetic mitosis-like figures", "bbox_format": "x1,y1,x2,y2"}}
    side = BOX_UM / config.mpp
    for row in tqdm(plan.to_dict("records"), desc="synthetic images", unit="image", disable=not progress):
        rng = np.random.default_rng(int(row["seed"]))
        image, figures, imposters = render_point_image(rng, config)  # always rendered: boxes come from it
        target = paths.images / row["file_name"]
        if not target.is_file():
            write_pyramidal_tiff(target, image, config.mpp, tile=config.tile, quality=config.quality)
        coco["images"].append({"id": int(row["image_id"]), "file_name": row["file_name"], "width": config.width,
                               "height": config.height, "mpp": config.mpp, "split": row["split"]})
        if row["split"] == "unlabeled":  # listed, but its figures are not annotated (for semi-supervised use)
            continue
        for category, centres in ((1, figures), (2, imposters)):
            for centre in centres:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": int(row["image_id"]),
                                            "category_id": category, "bbox": _box(centre, side, image.shape[:2])})
    with atomic_path(paths.coco_json) as tmp:
        tmp.write_text(json.dumps(coco, indent=1))
    with atomic_path(paths.images_csv) as tmp:
        plan.drop(columns=["seed"]).to_csv(tmp, index=False)
    return paths
