"""The one contract every aggregator follows, so models are interchangeable in configs and in the training code.

``forward(x (B, N, D), mask (B, N) bool) -> AggregatorOutput``: bag ``logits`` (B, C) with C = 1 for binary
tasks (the tumor logit) and C = number of classes otherwise; ``instance_scores`` (B, N), one raw tumor logit per
patch (higher = more tumor-like; what the ranking loss, mining and heatmaps use); ``attention`` (B, N) or None.
Padded patches (mask False) never change any output; their instance scores and attention are set to 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class AggregatorOutput:
    logits: Tensor
    instance_scores: Tensor
    attention: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class Aggregator(nn.Module):
    """Base class: stores the sizes and says how many logits a bag gets."""

    def __init__(self, in_dim: int, num_classes: int = 2):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.n_outputs = 1 if num_classes == 2 else num_classes

    def forward(self, x: Tensor, mask: Tensor) -> AggregatorOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def auxiliary_loss(self, output: AggregatorOutput, labels: Tensor) -> Tensor | None:
        """An aggregator's own extra training term (DSMIL max-instance, CLAM clustering); None if it has none."""
        return None

    def slide_logits(self, output: AggregatorOutput) -> Tensor:
        """The logits that slide scores are read from; the trained ``output.logits`` unless a model publishes
        another rule (DSMIL averages its two streams)."""
        return output.logits


def embedder(in_dim: int, hidden_dim: int, dropout: float) -> nn.Module:
    """The usual first layer of MIL models: project frozen embeddings to a smaller trainable space."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


def tumor_logit(logits: Tensor) -> Tensor:
    """Per-item tumor logit from (..., C) logits: the logit itself if C = 1, else log-odds of "not class 0"."""
    if logits.shape[-1] == 1:
        return logits[..., 0]
    return torch.logsumexp(logits[..., 1:], dim=-1) - logits[..., 0]


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """Softmax over valid positions only; padded positions get exactly 0."""
    scores = scores.masked_fill(~_expand(mask, scores), float("-inf"))
    return torch.softmax(scores, dim=dim).masked_fill(~_expand(mask, scores), 0.0)


def masked_max(values: Tensor, mask: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Max (and argmax) over valid positions."""
    return values.masked_fill(~_expand(mask, values), float("-inf")).max(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    weights = _expand(mask, values).to(values.dtype)
    return (values * weights).sum(dim) / weights.sum(dim).clamp_min(1.0)


def zero_padding(values: Tensor, mask: Tensor) -> Tensor:
    return values.masked_fill(~_expand(mask, values), 0.0)


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    """(B, N) mask broadcast to (B, N, ...) values."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


class PatchClassifierPooling(Aggregator):
    """Classify every embedded patch, then pool the patch logits into the bag logit (``pool`` says how)."""

    def __init__(self, in_dim: int, num_classes: int = 2, hidden_dim: int = 128, dropout: float = 0.1):
        super().__init__(in_dim, num_classes)
        self.embed = embedder(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, self.n_outputs)

    def pool(self, patch_logits: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor) -> AggregatorOutput:
        patch_logits = self.classifier(self.embed(x))  # (B, N, C)
        return AggregatorOutput(logits=self.pool(patch_logits, mask),
                                instance_scores=zero_padding(tumor_logit(patch_logits), mask))
