"""A small TransMIL (Shao et al., NeurIPS 2021): transformer layers over patch tokens with a PPEG in between.

Tokens are embedded, a class token is prepended, one self-attention layer runs, the PPEG (depth-wise convolutions
of 7, 5 and 3 over the tokens laid out on a square grid) adds position information, a second layer runs, and the
class token is classified. Plain multi-head attention replaces the Nystrom approximation: bags here are small
enough, and exact attention is simpler to mask.

The PPEG grid depends on each bag's own length, and a padded token would leak into its neighbours through the
convolutions, so bags are processed one at a time over their valid patches only; padding then cannot matter.
The grid is filled by repeating the first tokens, as in the original. Instance scores: the bag classifier applied
to each patch token after the last layer. Attention: the class token's attention to each patch in the last
layer, averaged over heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mil.aggregators.base import Aggregator, AggregatorOutput, tumor_logit


class PPEG(nn.Module):
    """Pyramid position encoding generator: x + conv7(x) + conv5(x) + conv3(x) on the token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: Tensor, side: int) -> Tensor:
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return grid.flatten(2).transpose(1, 2)


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        normed = self.norm(tokens)
        out, weights = self.attention(normed, normed, normed, need_weights=True, average_attn_weights=True)
        return tokens + out, weights


class TransMIL(Aggregator):
    def __init__(self, in_dim: int, num_classes: int = 2, hidden_dim: int = 128, heads: int = 4, dropout: float = 0.1):
        super().__init__(in_dim, num_classes)
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.layer1 = TransformerLayer(hidden_dim, heads, dropout)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = TransformerLayer(hidden_dim, heads, dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, self.n_outputs)

    def forward(self, x: Tensor, mask: Tensor) -> AggregatorOutput:
        logits, scores, attention = [], x.new_zeros(mask.shape), x.new_zeros(mask.shape)
        for row in range(x.shape[0]):
            bag_logits, scores_row, attention_row = self._one_bag(x[row][mask[row]][None])
            logits.append(bag_logits)
            valid = mask[row].nonzero()[:, 0]
            scores[row, valid] = scores_row.to(scores.dtype)
            attention[row, valid] = attention_row.to(attention.dtype)
        return AggregatorOutput(logits=torch.cat(logits), instance_scores=scores, attention=attention)

    def _one_bag(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.embed(x)  # (1, n, H)
        n = h.shape[1]
        side = max(1, math.ceil(math.sqrt(n)))
        h = torch.cat([h, h[:, : side * side - n]], dim=1) if side * side > n else h
        h = h if h.shape[1] == side * side else torch.cat([h] + [h[:, :1]] * (side * side - h.shape[1]), dim=1)
        tokens = torch.cat([self.cls_token.expand(1, -1, -1), h], dim=1)
        tokens, _ = self.layer1(tokens)
        tokens = torch.cat([tokens[:, :1], self.ppeg(tokens[:, 1:], side)], dim=1)
        tokens, weights = self.layer2(tokens)
        tokens = self.norm(tokens)
        patch_logits = self.classifier(tokens[:, 1 : n + 1])  # (1, n, C)
        return self.classifier(tokens[:, 0]), tumor_logit(patch_logits)[0], weights[0, 0, 1 : n + 1]
