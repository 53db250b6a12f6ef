"""Augmentation in embedding space: cheap stand-ins for pixel augmentation when the encoder is frozen.

Three kinds, applied to a training batch of (standardised) embeddings:
- view sampling happens in the dataset (:mod:`features.heads.data`): each step sees the embedding of one of
  the V augmented views stored at extraction time, the idea of Nivaggioli et al. (arXiv 2303.05180);
- Gaussian noise with a fixed standard deviation, in units of the per-dimension training spread;
- mixup between samples of the batch, with soft targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeatureAugment:
    """What to do to each training batch; all off means plain training on the stored embeddings."""

    view_sampling: bool = True   # draw one stored view per sample per step (no effect without views)
    include_clean: bool = True   # the un-augmented embedding is one of the views drawn from
    noise_std: float = 0.0       # Gaussian noise, in standard deviations of each dimension
    mixup_alpha: float = 0.0     # Beta(alpha, alpha) mixing weight; 0 turns mixup off


def add_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return x + std * torch.randn_like(x) if std > 0 else x


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner; ``targets`` are one-hot (or already soft) class rows."""
    if alpha <= 0 or len(x) < 2:
        return x, targets
    weight = torch.distributions.Beta(alpha, alpha).sample((len(x), 1)).to(x)
    weight = torch.maximum(weight, 1 - weight)  # keep the sample's own label dominant
    partner = torch.randperm(len(x), device=x.device)
    return weight * x + (1 - weight) * x[partner], weight * targets + (1 - weight) * targets[partner]
