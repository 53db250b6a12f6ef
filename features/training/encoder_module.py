"""A timm encoder with a projection head, trained with the one contrastive loss (SimCLR or SupCon).

Only the encoder leaves this module (:func:`features.training.weights.save_encoder_weights`): the projection
head exists to shape the loss and is thrown away, as in SimCLR, because the layer before it transfers better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from features.encoders import EncoderConfig, build_transform, create_model, weights_file
from features.errors import InputError
from features.training.contrastive import supcon_loss
from features.training.weights import load_encoder_weights


@dataclass
class OptimConfig:
    """SGD with momentum and a cosine schedule after a linear warm-up (ItS2CLR fine-tuning)."""

    lr: float = 0.01
    """Peak learning rate (after the warm-up)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """L2 weight decay."""
    warmup_fraction: float = 0.05
    """Share of the steps spent warming the learning rate up linearly."""
    temperature: float = 0.07
    """Temperature of the contrastive (SimCLR / SupCon) loss."""
    proj_dim: int = 128
    """Width of the projection head's output (the contrastive space)."""
    hidden_dim: int = 512
    """Width of the projection head's hidden layer."""
    freeze_norm_stats: bool = True
    """Keep BatchNorm statistics as the extractor saw them: small contrastive batches of a few hundred mined patches
    would otherwise overwrite the running statistics, and the re-extracted features would then shift for every
    patch, not only where the loss asked for a change."""


def build_encoder_model(spec: EncoderConfig) -> nn.Module:
    """The trunk ``features extract`` would build (seeded random init), in training mode, weights loaded."""
    model = create_model(spec)
    weights = weights_file(spec)  # a local file, or a preset's hub_file fetched from the hub
    if weights:
        load_encoder_weights(model, weights, strict=spec.strict)
    return model


def input_size(model: nn.Module, spec: EncoderConfig, patch_size: int) -> tuple[int, tuple, tuple]:
    """Pixels, mean and std the encoder sees at extraction; training must match them."""
    _, described = build_transform(model, spec, patch_size)
    return int(described["input_size"][-1]), tuple(described["mean"]), tuple(described["std"])


SPREAD_METRIC = "train/embedding_spread"
COLLAPSED_SPREAD = 1e-3


def embedding_spread(features: torch.Tensor) -> torch.Tensor:
    """Mean distance of a batch's embeddings from their centre, relative to their norm: 0 means collapsed."""
    features = features.float()
    spread = (features - features.mean(dim=0)).norm(dim=1).mean()
    return spread / (features.norm(dim=1).mean() + 1e-12)


def check_not_collapsed(trainer: L.Trainer, out: str) -> None:
    """Refuse to write an encoder that maps every patch to the same embedding (or whose loss went non-finite).

    A collapsed encoder would make every later stage (extraction, MIL, mining) silently meaningless.
    """
    metrics = trainer.callback_metrics
    spread, loss = metrics.get(SPREAD_METRIC), metrics.get("train/loss")
    if (spread is not None and float(spread) < COLLAPSED_SPREAD) or (loss is not None and not math.isfinite(float(loss))):
        raise InputError(f"{out}: training collapsed (embedding spread {float(spread or 0):.2g}, loss "
                         f"{float(loss or 0):.3g}); nothing written. Lower --optim.lr or keep "
                         "--trainer.gradient_clip_val set, then rerun")


class ContrastiveEncoder(L.LightningModule):
    """Encoder + MLP projection head; a batch is ``(views (B, V, C, H, W), labels (B,))``, labels < 0 = SimCLR."""

    def __init__(self, encoder: EncoderConfig, optim: OptimConfig):
        super().__init__()
        self.spec, self.optim = encoder, optim
        self.encoder = build_encoder_model(encoder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(encoder.seed + 1)
            dim = int(self.encoder.num_features)
            self.head = nn.Sequential(nn.Linear(dim, optim.hidden_dim), nn.ReLU(inplace=True),
                                      nn.Linear(optim.hidden_dim, optim.proj_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))

    def on_train_epoch_start(self) -> None:
        if self.optim.freeze_norm_stats:
            for layer in self.encoder.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        views, labels = batch
        b, v = views.shape[:2]
        features = self.encoder(views.flatten(0, 1))
        z = self.head(features).view(b, v, -1)
        loss = supcon_loss(z, None if bool((labels < 0).all()) else labels, self.optim.temperature)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log(SPREAD_METRIC, embedding_spread(features.detach()), batch_size=b)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.optim.lr, momentum=self.optim.momentum,
                                    weight_decay=self.optim.weight_decay)
        planned = getattr(self.trainer.datamodule, "stepping_batches", None)  # exact for phase-by-phase epochs
        total = max(1, int((planned and planned(self.trainer)) or self.trainer.estimated_stepping_batches))
        warmup = int(self.optim.warmup_fraction * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))  # phases differ in length: clamp
            return 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@dataclass
class TrainerSpec:
    """The Lightning Trainer flags a user may need: devices and precision for multi-GPU, caps for quick runs."""

    accelerator: str = "auto"
    """cpu, gpu, mps or auto (Lightning's names)."""
    devices: int | str = "auto"
    """Devices per node, or auto."""
    strategy: str = "auto"
    """Lightning strategy (auto, ddp ...)."""
    num_nodes: int = 1
    """Machines."""
    precision: str = "32-true"
    """Lightning precision (32-true, bf16-mixed, 16-mixed)."""
    max_epochs: int = 1
    """Epochs to train."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1 = no limit)."""
    limit_train_batches: int | float = 1.0
    """Batches per epoch (an int) or share of them (a float); for quick runs."""
    log_every_n_steps: int = 10
    """How often metrics are logged."""
    enable_progress_bar: bool = True
    """Show a progress bar (only on a terminal)."""
    deterministic: bool = False
    """Deterministic algorithms only (slower, bit-reproducible)."""
    gradient_clip_val: float | None = 1.0
    """Clip the gradient norm: a random-init trunk whose BatchNorm statistics are frozen can take a huge first step
    at the learning rates the method uses, after which every patch maps to the same embedding."""


def make_trainer(spec: TrainerSpec, root_dir: str, **extra: Any) -> L.Trainer:
    """A Trainer that writes logs under ``root_dir`` and keeps no checkpoints (the weights file is the output)."""
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        accelerator=spec.accelerator, devices=spec.devices, strategy=spec.strategy, num_nodes=spec.num_nodes,
        precision=spec.precision, max_epochs=spec.max_epochs, max_steps=spec.max_steps,
        limit_train_batches=spec.limit_train_batches, log_every_n_steps=spec.log_every_n_steps,
        enable_progress_bar=spec.enable_progress_bar, deterministic=spec.deterministic,
        gradient_clip_val=spec.gradient_clip_val,
        enable_checkpointing=False, logger=CSVLogger(root_dir, name="logs"), default_root_dir=root_dir,
        enable_model_summary=False, **extra,
    )
