"""Mean pooling: the bag is the average of its embedded patches, classified by a linear layer.

A linear classifier commutes with the mean, so the bag logit is exactly the mean of the per-patch logits; those
per-patch logits are the instance scores.
"""

from __future__ import annotations

from torch import Tensor, nn

from mil.aggregators.base import Aggregator, AggregatorOutput, embedder, masked_mean, tumour_logit, zero_padding


class MeanPool(Aggregator):
    def __init__(self, in_dim: int, num_classes: int = 2, hidden_dim: int = 128, dropout: float = 0.1):
        super().__init__(in_dim, num_classes)
        self.embed = embedder(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, self.n_outputs)

    def forward(self, x: Tensor, mask: Tensor) -> AggregatorOutput:
        patch_logits = self.classifier(self.embed(x))  # (B, N, C)
        return AggregatorOutput(
            logits=masked_mean(patch_logits, mask),
            instance_scores=zero_padding(tumour_logit(patch_logits), mask),
        )
