"""Mean pooling: the bag is the average of its embedded patches, classified by a linear layer.

A linear classifier commutes with the mean, so the bag logit is exactly the mean of the per-patch logits; those
per-patch logits are the instance scores.
"""

from __future__ import annotations

from torch import Tensor

from mil.aggregators.base import PatchClassifierPooling, masked_mean


class MeanPool(PatchClassifierPooling):
    def pool(self, patch_logits: Tensor, mask: Tensor) -> Tensor:
        return masked_mean(patch_logits, mask)
