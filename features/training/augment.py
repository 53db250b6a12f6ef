"""Histology augmentations for contrastive training.

Tissue has no canonical orientation, so flips and 90-degree rotations are free. Colour jitter stays within the
range that H&E staining varies between labs (small hue shifts; a large hue shift would turn eosin blue and
teach the encoder to ignore the very contrast that separates tumor from stroma). Crops are mild because a
patch is already a small field of view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Strengths of each augmentation; the defaults suit 20x (0.5 mpp) H&E patches."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Random resized crop: range of the kept area fraction."""
    brightness: float = 0.2
    """Colour jitter: brightness strength."""
    contrast: float = 0.2
    """Colour jitter: contrast strength."""
    saturation: float = 0.15
    """Colour jitter: saturation strength."""
    hue: float = 0.04
    """Colour jitter: hue shift (fraction of the colour circle)."""
    jitter_p: float = 0.8
    """Probability of colour jitter."""
    blur_p: float = 0.3
    """Probability of Gaussian blur."""
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    """Range of the blur's sigma in pixels."""


class RandomRotate90(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees, chosen uniformly."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, turns, dims=(-2, -1)) if turns else image


def histology_augment(size: int, config: AugmentConfig | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """PIL image -> normalised float tensor (3, size, size), randomly augmented."""
    config = config or AugmentConfig()
    blur_kernel = max(3, (size // 20) | 1)  # odd, a few pixels at 224
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=config.crop_scale, ratio=(0.9, 1.1), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        RandomRotate90(),
        v2.RandomApply([v2.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue)],
                       p=config.jitter_p),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=config.blur_sigma)], p=config.blur_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


class MultiView:
    """Apply one random transform ``views`` times to the same image: (views, C, H, W)."""

    def __init__(self, transform: Callable, views: int = 2):
        self.transform = transform
        self.views = views

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.views)])
