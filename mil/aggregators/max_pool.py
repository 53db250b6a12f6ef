"""Max pooling: classify every patch, take each class's highest patch logit as the bag logit.

The classic MIL assumption (a slide is tumor if any patch is); instance scores are the per-patch logits.
"""

from __future__ import annotations

from torch import Tensor

from mil.aggregators.base import PatchClassifierPooling, masked_max


class MaxPool(PatchClassifierPooling):
    def pool(self, patch_logits: Tensor, mask: Tensor) -> Tensor:
        return masked_max(patch_logits, mask)[0]
