"""Bag-level losses and the training objective that combines them.

``BagLoss`` = ``bag_weight`` x bag loss (BCE with ``pos_weight`` for binary, cross-entropy otherwise)
+ ``max_instance_weight`` x the same loss on the bag's most tumor-like patch
+ ``ranking_weight`` x the patch-wise ranking loss (``mil.losses.ranking``)
+ the aggregator's own auxiliary term (DSMIL, CLAM), added by the training module.

``pos_weight="auto"`` takes negatives / positives of the training split from the data module, so an
imbalanced cohort is weighted without hand-tuning; a number fixes it; None turns it off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mil.losses.ranking import patch_ranking_loss

if TYPE_CHECKING:  # losses stay importable by the aggregators without a cycle
    from mil.aggregators.base import AggregatorOutput


def classification_loss(logits: Tensor, labels: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """BCE on a single tumor logit (B, 1), cross-entropy on (B, C) logits."""
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), pos_weight=pos_weight)
    return F.cross_entropy(logits, labels)


def max_instance_loss(instance_scores: Tensor, mask: Tensor, labels: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """BCE of each bag's highest patch tumor logit against "is this slide tumor" (label > 0)."""
    top = instance_scores.masked_fill(~mask, float("-inf")).max(dim=1).values
    return F.binary_cross_entropy_with_logits(top, (labels > 0).float(), pos_weight=pos_weight)


class BagLoss(nn.Module):
    """The weighted sum of bag, max-instance and ranking terms; returns each term for logging."""

    def __init__(self, pos_weight: float | str | None = "auto", bag_weight: float = 1.0,
                 max_instance_weight: float = 0.0, ranking_weight: float = 0.0, ranking_k: int = 10,
                 ranking_margin: float = 1.0):
        """
        Args:
            pos_weight: "auto" (negatives/positives of the training split), a number, or None.
            bag_weight: Weight of the bag classification loss.
            max_instance_weight: Weight of the max-instance BCE (0.5 in HNM-WSI).
            ranking_weight: Weight of the patch-wise ranking loss (0.1 in HNM-WSI; 0 = off).
            ranking_k: Top-k patches averaged per slide in the ranking loss.
            ranking_margin: Required gap between tumor and normal top-k means.
        """
        super().__init__()
        if isinstance(pos_weight, str) and pos_weight != "auto":
            raise ValueError(f"pos_weight must be 'auto', a number or null, got {pos_weight!r}")
        self.pos_weight_setting = pos_weight
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight) if _is_number(pos_weight) else 1.0))
        self.bag_weight = bag_weight
        self.max_instance_weight = max_instance_weight
        self.ranking_weight = ranking_weight
        self.ranking_k = ranking_k
        self.ranking_margin = ranking_margin

    def set_auto_pos_weight(self, value: float | None) -> None:
        if self.pos_weight_setting == "auto" and value is not None:
            self.pos_weight.fill_(value)

    def forward(self, output: "AggregatorOutput", mask: Tensor, labels: Tensor) -> dict[str, Tensor]:
        weight = None if self.pos_weight_setting is None else self.pos_weight
        terms = {"bag": classification_loss(output.logits.float(), labels, weight)}
        scores = output.instance_scores.float()
        if self.max_instance_weight:
            terms["max_instance"] = max_instance_loss(scores, mask, labels, weight)
        if self.ranking_weight:
            terms["ranking"] = patch_ranking_loss(scores, mask, labels, self.ranking_k, self.ranking_margin)
        weights = {"bag": self.bag_weight, "max_instance": self.max_instance_weight, "ranking": self.ranking_weight}
        terms["loss"] = sum(weights[name] * value for name, value in terms.items())
        return terms


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
