"""A linear or small-MLP head on frozen embeddings, as a LightningModule.

The head carries the standardisation learnt on its training embeddings (buffers ``mean`` and ``std``), so a
saved head applies to raw stored embeddings without any side file. Feature-space augmentation (noise, mixup)
is applied inside the training step; view sampling happens in the dataset.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from features.heads.augment import FeatureAugment, add_noise, mixup


def build_head(in_dim: int, n_classes: int, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """``hidden == 0``: a linear probe; otherwise one hidden layer with GELU and dropout."""
    if hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_classes))
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))


class HeadModule(L.LightningModule):
    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 0, dropout: float = 0.0, lr: float = 1e-3,
                 weight_decay: float = 1e-4, noise_std: float = 0.0, mixup_alpha: float = 0.0,
                 class_weights: list[float] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.head = build_head(in_dim, n_classes, hidden, dropout)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.register_buffer("class_weights", torch.tensor(class_weights or [1.0] * n_classes, dtype=torch.float32))
        self.augment = FeatureAugment(noise_std=noise_std, mixup_alpha=mixup_alpha)

    def set_standardisation(self, features: torch.Tensor) -> None:
        """Centre and scale by the training embeddings so one learning rate and noise level fit any encoder."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean) / self.std)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = add_noise((x - self.mean) / self.std, self.augment.noise_std)
        targets = F.one_hot(y, self.hparams.n_classes).to(x.dtype)
        x, targets = mixup(x, targets, self.augment.mixup_alpha)
        logits = self.head(x)
        # Soft-target cross-entropy with class weights (weights balance rare positives such as mitoses).
        loss = -(targets * self.class_weights * F.log_softmax(logits, dim=1)).sum(1).mean()
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y, weight=self.class_weights), prog_bar=True, batch_size=len(x))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
