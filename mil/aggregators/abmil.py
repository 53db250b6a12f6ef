"""Gated attention MIL (Ilse et al., 2018).

Patches are embedded (h_i), scored by a gated attention branch a_i = w^T (tanh(V h_i) * sigmoid(U h_i)),
softmax-normalised over the bag's valid patches, and the bag embedding sum_i a_i h_i is classified linearly.

Instance score: the bag classifier applied to each patch embedding, s_i = W h_i + b. Since the attention
weights sum to 1, the bag logit is exactly sum_i a_i s_i: the attention says how much a patch counts, s_i says
which way it pushes. Attention alone is not a tumor score (normal slides also attend to some patches), and the
ranking loss needs a signed per-patch logit, so s_i is what mining and heatmaps read; attention is kept too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mil.aggregators.base import Aggregator, AggregatorOutput, embedder, masked_softmax, tumor_logit, zero_padding


class GatedAttention(nn.Module):
    """(B, N, H) -> (B, N) unnormalised attention scores."""

    def __init__(self, hidden_dim: int, attention_dim: int, dropout: float = 0.0):
        super().__init__()
        self.tanh = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.score(self.tanh(h) * self.gate(h))[..., 0]


class ABMIL(Aggregator):
    def __init__(self, in_dim: int, num_classes: int = 2, hidden_dim: int = 128, attention_dim: int = 64,
                 dropout: float = 0.25):
        super().__init__(in_dim, num_classes)
        self.embed = embedder(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, self.n_outputs)

    def forward(self, x: Tensor, mask: Tensor) -> AggregatorOutput:
        return self.attend(x, mask)[0]

    def attend(self, x: Tensor, mask: Tensor) -> tuple[AggregatorOutput, Tensor]:
        """The output and the embedded patches (B, N, H), which CLAM-SB's instance loss also needs."""
        h = self.embed(x)
        attention = masked_softmax(self.attention(h), mask)
        bag = torch.einsum("bn,bnh->bh", attention, h)
        output = AggregatorOutput(
            logits=self.classifier(bag),
            instance_scores=zero_padding(tumor_logit(self.classifier(h)), mask),
            attention=attention,
        )
        return output, h
