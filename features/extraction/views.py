"""Test-time views of a batch of patches: the 8 symmetries of the square (D4) and seeded augmented views.

Tissue has no canonical orientation, so an embedding averaged over the 8 rotations/flips (``--tta d4``) is
orientation-free. Augmented views (``--views V``) are stored beside the plain embedding for training bag-level
models with feature-space augmentation; their random parameters are drawn per slide from a seed, per patch
row, so they do not depend on batch size, worker count or how slides are sharded over processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

D4 = tuple((k, flip) for flip in (False, True) for k in range(4))  # (quarter turns, mirror first)


def d4(batch: torch.Tensor, index: int) -> torch.Tensor:
    """Element ``index`` (0..7) of the dihedral group applied to (B, C, H, W) images."""
    k, flip = D4[index]
    out = batch.flip(-1) if flip else batch
    return torch.rot90(out, k, dims=(-2, -1)) if k else out


def tta_d4(embed: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """Mean embedding over the 8 rotations/flips of each patch."""
    total = None
    for index in range(len(D4)):
        emb = embed(d4(batch, index)).float()
        total = emb if total is None else total + emb
    return total / len(D4)


def slide_seed(seed: int, slide_id: str) -> int:
    """A stable per-slide seed (Python's ``hash`` changes between processes, sha256 does not)."""
    digest = hashlib.sha256(f"{seed}:{slide_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class ViewPlan:
    """Random view parameters for every (view, patch) of one slide, drawn once from the slide's seed."""

    def __init__(self, n_views: int, n_patches: int, seed: int, slide_id: str,
                 strength: float = 0.2):
        rng = np.random.default_rng(slide_seed(seed, slide_id))
        shape = (n_views, n_patches)
        self.symmetry = rng.integers(0, len(D4), size=shape)
        self.brightness = rng.uniform(1 - strength, 1 + strength, size=shape).astype(np.float32)
        self.contrast = rng.uniform(1 - strength, 1 + strength, size=shape).astype(np.float32)
        self.saturation = rng.uniform(1 - strength, 1 + strength, size=shape).astype(np.float32)

    def apply(self, view: int, rows: np.ndarray, batch: torch.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> torch.Tensor:
        """View ``view`` of normalised patches whose slide rows are ``rows``; returns normalised images."""
        mean_t = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
        images = batch * std_t + mean_t  # back to [0, 1] so jitter means what it says

        def per_row(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values[view, rows]).to(batch.device, batch.dtype).view(-1, 1, 1, 1)

        images = images * per_row(self.brightness)
        grey = images.mean(dim=1, keepdim=True)
        images = grey + (images - grey) * per_row(self.saturation)
        level = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (level + (images - level) * per_row(self.contrast)).clamp(0, 1)
        out = torch.empty_like(images)
        symmetry = self.symmetry[view, rows]
        for index in np.unique(symmetry):
            pick = torch.from_numpy(np.flatnonzero(symmetry == index)).to(batch.device)
            out[pick] = d4(images[pick], int(index))
        return (out - mean_t) / std_t
