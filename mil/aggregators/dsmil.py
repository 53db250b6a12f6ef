"""DSMIL (Li et al., CVPR 2021): an instance classifier plus attention to each class's critical instance.

Stream 1 classifies every patch; its top patch per class is the "critical instance". Stream 2 scores every patch
by the similarity of its query to that critical query, pools value vectors with those weights and classifies
the pooled vectors. The max-instance loss (stream 1's top patch against the bag label) is the auxiliary term.
Instance scores are stream 1's per-patch logits; attention is stream 2's weights for the tumour class(es).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mil.aggregators.base import Aggregator, AggregatorOutput, embedder, masked_max, masked_softmax, tumour_logit, zero_padding
from mil.losses.bag import classification_loss


class DSMIL(Aggregator):
    def __init__(self, in_dim: int, num_classes: int = 2, hidden_dim: int = 128, query_dim: int = 64,
                 dropout: float = 0.1, instance_loss_weight: float = 0.5):
        super().__init__(in_dim, num_classes)
        self.embed = embedder(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, self.n_outputs)
        self.query = nn.Sequential(nn.Linear(hidden_dim, query_dim), nn.Tanh())
        self.value = nn.Linear(hidden_dim, hidden_dim)
        # One weight vector per class over the pooled value vector: DSMIL's Conv1d with kernel = value size.
        self.bag_classifier = nn.Conv1d(self.n_outputs, self.n_outputs, kernel_size=hidden_dim)
        self.instance_loss_weight = instance_loss_weight

    def forward(self, x: Tensor, mask: Tensor) -> AggregatorOutput:
        h = self.embed(x)
        instance_logits = self.instance_classifier(h)  # (B, N, C)
        max_logits, critical = masked_max(instance_logits, mask)  # (B, C)
        queries = self.query(h)  # (B, N, Q)
        critical_queries = torch.gather(queries, 1, critical[..., None].expand(-1, -1, queries.shape[-1]))
        similarity = torch.einsum("bnq,bcq->bnc", queries, critical_queries) / queries.shape[-1] ** 0.5
        attention = masked_softmax(similarity, mask)  # (B, N, C), softmax over patches
        pooled = torch.einsum("bnc,bnh->bch", attention, self.value(h))
        logits = self.bag_classifier(pooled)[..., 0]
        tumour_attention = attention[..., 0] if self.n_outputs == 1 else attention[..., 1:].mean(-1)
        return AggregatorOutput(
            logits=logits,
            instance_scores=zero_padding(tumour_logit(instance_logits), mask),
            attention=zero_padding(tumour_attention, mask),
            extras={"max_instance_logits": max_logits},
        )

    def auxiliary_loss(self, output: AggregatorOutput, labels: Tensor) -> Tensor | None:
        return self.instance_loss_weight * classification_loss(output.extras["max_instance_logits"].float(), labels)
