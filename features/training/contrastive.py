"""Contrastive losses: one supervised-contrastive (SupCon) loss that is also SimCLR's NT-Xent.

NT-Xent (SimCLR pretraining) is SupCon where every sample is its own class: the only positives of a view are
the other views of the same patch. Fine-tuning passes pseudo-labels instead, so every patch with the same
label is a positive. Keeping one implementation means pretraining and fine-tuning cannot drift apart.

For anchor ``i`` among all ``B * V`` normalised embeddings ``z``, with positives ``P(i)`` (same label, not ``i``)::

    loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )

averaged over anchors that have at least one positive (Khosla et al. 2020, the "L_out" form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.07) -> torch.Tensor:
    """SupCon over ``embeddings`` (B, V, D); ``labels`` (B,) or None for NT-Xent (instance discrimination)."""
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be (batch, views, dim), got {tuple(embeddings.shape)}")
    batch, views, _ = embeddings.shape
    if labels is None:
        labels = torch.arange(batch, device=embeddings.device)
    if labels.shape != (batch,):
        raise ValueError(f"labels must be ({batch},), got {tuple(labels.shape)}")
    z = F.normalize(embeddings.float(), dim=-1).transpose(0, 1).reshape(batch * views, -1)  # view-major
    anchor_labels = labels.repeat(views)
    logits = z @ z.T / temperature
    self_mask = torch.eye(batch * views, dtype=torch.bool, device=z.device)
    # Drop each anchor's similarity to itself from the denominator; logsumexp keeps exp stable at t = 0.07.
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (anchor_labels[:, None] == anchor_labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not bool(has_positive.any()):
        return embeddings.sum() * 0.0  # no pair to pull together: a zero that keeps the graph
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has_positive] / counts[has_positive]
    return -mean_log_prob.mean()


def nt_xent_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent for two batches of views (B, D) of the same B patches."""
    return supcon_loss(torch.stack([view_a, view_b], dim=1), None, temperature)


class SupConLoss(torch.nn.Module):
    """Module form of :func:`supcon_loss` with a fixed temperature."""

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return supcon_loss(embeddings, labels, self.temperature)
