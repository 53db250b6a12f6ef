"""CLAM-SB (Lu et al., Nature BME 2021): gated attention plus instance-level clustering.

The bag side is gated attention MIL (see ``abmil``). The extra term: for a bag of class y, one small binary
classifier per class learns to call the k most attended patches "class y evidence" and the k least attended
"not"; with ``subtyping`` the other classes' classifiers also learn that the top-k are not theirs. This adds
patch-level supervision from the model's own attention. k is capped at half the bag's valid patches so the two
sets never overlap. Instance scores are the bag classifier applied to each patch, as in ``abmil``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mil.aggregators.abmil import ABMIL
from mil.aggregators.base import AggregatorOutput


class CLAMSB(ABMIL):
    def __init__(self, in_dim: int, num_classes: int = 2, hidden_dim: int = 128, attention_dim: int = 64,
                 dropout: float = 0.25, k_sample: int = 8, instance_loss_weight: float = 0.3, subtyping: bool = False):
        super().__init__(in_dim, num_classes, hidden_dim, attention_dim, dropout)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(num_classes))
        self.k_sample = k_sample
        self.instance_loss_weight = instance_loss_weight
        self.subtyping = subtyping

    def forward(self, x: Tensor, mask: Tensor) -> AggregatorOutput:
        output, h = self.attend(x, mask)
        output.extras = {"embeddings": h, "mask": mask}
        return output

    def auxiliary_loss(self, output: AggregatorOutput, labels: Tensor) -> Tensor | None:
        losses = [self._bag_instance_loss(h[m], a[m], int(y)) for h, a, m, y in
                  zip(output.extras["embeddings"], output.attention, output.extras["mask"], labels)]
        losses = [loss for loss in losses if loss is not None]
        if not losses:
            return None
        return self.instance_loss_weight * torch.stack(losses).mean()

    def _bag_instance_loss(self, h: Tensor, attention: Tensor, label: int) -> Tensor | None:
        k = min(self.k_sample, len(h) // 2)
        if k == 0:
            return None
        order = attention.argsort(descending=True)
        top, bottom = h[order[:k]], h[order[-k:]]
        ones, zeros = torch.ones(k, dtype=torch.long, device=h.device), torch.zeros(k, dtype=torch.long, device=h.device)
        in_class = self.instance_classifiers[label]
        terms = [F.cross_entropy(in_class(torch.cat([top, bottom])).float(), torch.cat([ones, zeros]))]
        if self.subtyping:
            terms += [F.cross_entropy(self.instance_classifiers[c](top).float(), zeros)
                      for c in range(self.num_classes) if c != label]
        return torch.stack(terms).mean()
