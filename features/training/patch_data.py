"""Patch pixels for encoder training, streamed from the slides.

Only coordinates live in memory (16 bytes a patch); pixels are read in DataLoader workers through
:class:`features.patches.PatchDataset`, so memory stays bounded however large the cohort. Pretraining samples a
seeded subset of all tissue patches; fine-tuning reads the patches of a selection file, and arranges each epoch
as a *phase* (ItS2CLR): a pass over the hard-negative pool with positives mixed into every batch, or a pass over
the self-paced positives with negatives mixed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from features.errors import InputError
from features.patches import PatchDataset, PatchItem
from features.slides import SlideRef, list_slides, open_slide
from features.store import COORDS_DIR, FEATURES_DIR, read_coords
from features.tiling import Geometry, TilingConfig, tile_slide

PHASES = ("hard_negative", "positive")


def slide_refs(slides: str | Path) -> dict[str, SlideRef]:
    return {ref.slide_id: ref for ref in list_slides(slides)}


def coords_file(root: str | Path, slide_id: str) -> Path | None:
    """A slide's coords in a store root (coords/ or features/<tag>/), a coords folder, or a features folder."""
    root = Path(root)
    candidates = [root / COORDS_DIR / f"{slide_id}.h5", root / f"{slide_id}.h5"]
    if (root / FEATURES_DIR).is_dir():
        candidates += sorted((root / FEATURES_DIR).glob(f"*/{slide_id}.h5"))
    # CLAM's features folder, TRIDENT's job folder
    candidates += [root / "h5_files" / f"{slide_id}.h5", *sorted(root.glob(f"features_*/{slide_id}.h5"))]
    return next((path for path in candidates if path.is_file()), None)


def slide_coords(ref: SlideRef, coords_root: str | Path | None, tiling: TilingConfig | None) -> tuple[np.ndarray, Geometry]:
    """Coordinates and geometry of one slide: from the store when given, else by tiling the slide now."""
    if coords_root is not None:
        path = coords_file(coords_root, ref.slide_id)
        if path is None:
            raise InputError(f"{coords_root}: no coords for slide {ref.slide_id}; run `features tile` on the same slides")
        coords, attrs = read_coords(path)
        return coords, Geometry.from_attrs(attrs)
    slide = open_slide(ref.path)
    try:
        coords, geometry, _ = tile_slide(slide, ref, None, tiling)
    finally:
        slide.close()
    return coords, geometry


def sample_items(refs: list[SlideRef], coords_root: str | Path | None, max_patches: int | None, seed: int,
                 tiling: TilingConfig | None = None) -> list[PatchItem]:
    """A seeded uniform sample of at most ``max_patches`` tissue patches over all slides."""
    per_slide = [(ref, *slide_coords(ref, coords_root, tiling)) for ref in refs]
    sizes = np.array([len(coords) for _, coords, _ in per_slide], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        raise InputError("no tissue patches in any slide; check --slides / --coords (or the tissue settings)")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(total, max_patches or total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    items = []
    for index, (ref, coords, geometry) in enumerate(per_slide):
        local = chosen[(chosen >= starts[index]) & (chosen < starts[index + 1])] - starts[index]
        items += [PatchItem(str(ref.path), int(x), int(y), geometry) for x, y in coords[local]]
    return items


@dataclass
class Selected:
    """Selection rows turned into readable patches, with their training label and kind."""

    items: list[PatchItem]
    labels: np.ndarray  # 1 = pseudo-positive, 0 = negative
    kinds: np.ndarray  # positive | hard_negative | negative

    def pool(self, kind: str | tuple[str, ...]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.kinds, [kind] if isinstance(kind, str) else list(kind)))


def selection_items(selection: pd.DataFrame, refs: dict[str, SlideRef], coords_root: str | Path,
                    patch_size_level0: int | None = None) -> Selected:
    """Patches of a selection; geometry comes from each slide's coords file so pixels match extraction exactly
    (for CLAM or TRIDENT files, see :func:`features.layouts.patch_geometry`)."""
    from features.layouts import patch_geometry

    items: list[PatchItem] = []
    labels, kinds = [], []
    for slide_id, rows in selection.groupby("slide_id", sort=True):
        if slide_id not in refs:
            raise InputError(f"selection names slide {slide_id!r}, which is not among --slides; pass the same cohort")
        path = coords_file(coords_root, slide_id)
        if path is None:
            raise InputError(f"{coords_root}: no coords for slide {slide_id}; pass the feature store mining used")
        geometry = patch_geometry(path, refs[slide_id], patch_size_level0)
        items += [PatchItem(str(refs[slide_id].path), int(x), int(y), geometry) for x, y in zip(rows["x"], rows["y"])]
        labels += rows["pseudo_label"].astype(int).tolist()
        kinds += rows["kind"].astype(str).tolist()
    return Selected(items, np.asarray(labels, dtype=np.int64), np.asarray(kinds, dtype=object))


class ViewsDataset(Dataset):
    """``(views (V, C, H, W), label)``; label -1 means "no label": instance discrimination (SimCLR)."""

    def __init__(self, items: list[PatchItem], transform, labels: np.ndarray | None = None):
        self.patches = PatchDataset(items, transform)
        self.labels = np.full(len(items), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        views, _ = self.patches[index]
        return views, int(self.labels[index])


def phase_of(epoch: int, phases: tuple[str, ...] = PHASES) -> str:
    return phases[epoch % len(phases)]


def phase_order(selected: Selected, phase: str, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Indices of one epoch, ``batch_size`` at a time: half from the phase's pool, half mixed in.

    Hard-negative phase: one pass over the hard negatives, each batch topped up with positives (so SupCon always
    has both classes). Positive phase: one pass over the positives, topped up with negatives (plain and hard).
    The mixed-in half cycles through its own shuffled pool. Seeded by (seed, epoch): reruns repeat exactly.
    """
    rng = np.random.default_rng([seed, epoch])
    positives = selected.pool("positive")
    negatives = selected.pool(("negative", "hard_negative"))
    hard = selected.pool("hard_negative")
    if phase == "hard_negative" and len(hard):
        main, mixed = hard, positives
    else:
        main, mixed = positives, negatives
    if len(main) == 0 or len(mixed) == 0:
        raise InputError("the selection needs both positives and negatives to fine-tune; mine with more slides or "
                         "a lower --mining.threshold")
    share = max(1, batch_size // 2)
    n_batches = math.ceil(len(main) / share)
    main_order = np.resize(rng.permutation(main), n_batches * share)
    mixed_order = np.resize(rng.permutation(mixed), n_batches * (batch_size - share))
    batches = [np.concatenate([main_order[b * share:(b + 1) * share],
                               mixed_order[b * (batch_size - share):(b + 1) * (batch_size - share)]])
               for b in range(n_batches)]
    return np.concatenate(batches)
