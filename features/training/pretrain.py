"""``features pretrain``: SimCLR pretraining of a timm encoder on a cohort's own tissue patches.

    features pretrain --slides cohort/slides --coords store/ --out encoders/simclr.safetensors \
        --encoder.name resnet18 --data.max_patches 20000 --trainer.max_epochs 10 [--trainer.devices 4]

HNM-WSI starts from an encoder pretrained by SimCLR on the target cohort, not from ImageNet: histology patches
are far from natural images. Two augmented views of each patch, NT-Xent over the batch. The output is a plain
timm state_dict in safetensors (+ ``.json`` sidecar) that ``features extract --encoder.weights`` loads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from features.encoders import EncoderConfig
from features.machine import default_workers
from features.options import parse
from features.tiling import TilingConfig
from features.training.augment import AugmentConfig, MultiView, histology_augment
from features.training.encoder_module import (ContrastiveEncoder, OptimConfig, TrainerSpec, check_not_collapsed,
                                              input_size, make_trainer)
from features.training.patch_data import ViewsDataset, sample_items, slide_refs
from features.training.weights import save_encoder_weights


@dataclass
class PatchLoading:
    """How patches reach the model."""

    batch_size: int = 64
    """Patches per step (each gives two views)."""
    num_workers: int = field(default_factory=default_workers)
    """DataLoader processes reading patches; default: the cores this process may use (at most 8)."""
    max_patches: int | None = 20000
    """Seeded uniform sample over the cohort; None = every tissue patch."""
    image_size: int | None = None
    """Train at this size; default the stored patch size."""
    seed: int = 0
    """Seeds the patch sample and the augmentations."""


def pretrain_optim() -> OptimConfig:
    return OptimConfig(lr=0.05, temperature=0.2, warmup_fraction=0.1)


@dataclass
class PretrainArgs:
    slides: str
    """Slide folder or slides CSV."""
    out: str
    """Weights file to write (.safetensors); a sidecar .json and a <name>_run/ log folder go next to it."""
    coords: str | None = None
    """Feature store (or coords folder) from `features tile`; if absent, slides are tiled now."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The encoder to pretrain (timm name, start weights, seed)."""
    optim: OptimConfig = field(default_factory=pretrain_optim)
    """Optimiser and loss settings."""
    data: PatchLoading = field(default_factory=PatchLoading)
    """How patches are sampled and loaded."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentation strengths."""
    tiling: TilingConfig = field(default_factory=TilingConfig)
    """Patch geometry when slides are tiled here."""
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    """Lightning Trainer flags."""


def main(argv: list[str] | None = None) -> None:
    pretrain(parse(PretrainArgs, argv, "features pretrain", __doc__))


def view_transform(module: ContrastiveEncoder, patch_size: int, image_size: int | None,
                   augment: AugmentConfig) -> tuple[MultiView, int]:
    """Two augmented views at the size and normalisation extraction will use (or ``image_size``)."""
    size, mean, std = input_size(module.encoder, module.spec, patch_size)
    size = image_size or size
    return MultiView(histology_augment(size, augment, mean, std), views=2), size


def run_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_run")


def pretrain(args: PretrainArgs) -> Path:
    out = Path(args.out)
    if out.is_file():
        print(f"{out} exists; skipping (delete it to pretrain again)")
        return out
    started = time.perf_counter()
    L.seed_everything(args.data.seed, workers=True, verbose=False)
    items = sample_items(list(slide_refs(args.slides).values()), args.coords, args.data.max_patches, args.data.seed,
                         args.tiling)
    module = ContrastiveEncoder(args.encoder, args.optim)
    transform, size = view_transform(module, items[0].geometry.patch_size, args.data.image_size, args.augment)
    dataset = ViewsDataset(items, transform)
    loader = DataLoader(dataset, batch_size=args.data.batch_size, shuffle=True, drop_last=len(dataset) > args.data.batch_size,
                        num_workers=args.data.num_workers, generator=torch.Generator().manual_seed(args.data.seed),
                        persistent_workers=False)
    trainer = make_trainer(args.trainer, str(run_dir(out)))
    trainer.fit(module, loader)
    check_not_collapsed(trainer, str(out))
    if trainer.is_global_zero:
        save_encoder_weights(module.encoder, out, {
            "command": "features pretrain", "method": "SimCLR (NT-Xent)", "encoder": args.encoder.name,
            "n_patches": len(items), "image_size": size, "steps": int(trainer.global_step),
            "seconds": round(time.perf_counter() - started, 2), "settings": json.loads(json.dumps(asdict(args), default=str)),
        })
        print(f"wrote {out} ({len(items)} patches, {trainer.global_step} steps)")
    return out
