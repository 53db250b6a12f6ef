"""Max pooling: classify every patch, take each class's highest patch logit as the bag logit.

The classic MIL assumption (a slide is tumour if any patch is); instance scores are the per-patch logits.
"""

from __future__ import annotations

from torch import Tensor, nn

from mil.aggregators.base import Aggregator, AggregatorOutput, embedder, masked_max, tumour_logit, zero_padding


class MaxPool(Aggregator):
    def __init__(self, in_dim: int, num_classes: int = 2, hidden_dim: int = 128, dropout: float = 0.1):
        super().__init__(in_dim, num_classes)
        self.embed = embedder(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, self.n_outputs)

    def forward(self, x: Tensor, mask: Tensor) -> AggregatorOutput:
        patch_logits = self.classifier(self.embed(x))  # (B, N, C)
        logits, _ = masked_max(patch_logits, mask)
        return AggregatorOutput(logits=logits, instance_scores=zero_padding(tumour_logit(patch_logits), mask))
