"""CONCH v1.5's tile embedding: a learned query attends over all of a ViT's output tokens, then a LayerNorm.

CONCH v1.5 was trained contrastively (CoCa) through this head, so its tile embedding is the head's 768-d
output, not the trunk's class token. The parameter names (``attn_pool_contrast.*``, ``ln_contrast.*``) are those of
the released vision tower, so its file loads as it is. Sizes are those TRIDENT builds the tower with.
"""

from __future__ import annotations

import torch
from torch import nn

from features.errors import InputError

CONCH_POOL_DIM = 768
CONCH_POOL_HEADS = 8


class AttentionalPooler(nn.Module):
    """Multi-head cross-attention from ``n_queries`` learned queries to the tokens; bias-free projections.

    Keys and values come from the layer-normed tokens, queries from the layer-normed learned query; the heads'
    outputs are concatenated and projected back to ``dim``. Returns ``(B, n_queries, dim)``.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = CONCH_POOL_HEADS, n_queries: int = 1):
        super().__init__()
        if dim % heads:
            raise InputError(f"attentional pooler: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(batch, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, n, d)
        weights = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.to_out((weights @ v).transpose(1, 2).flatten(2))


class AttentionPooledTrunk(nn.Module):
    """A timm ViT whose tokens (class token included, after the final norm) go through CONCH v1.5's pooler and
    LayerNorm: the embedding CONCH v1.5's vision tower gives in TRIDENT and TITAN."""

    def __init__(self, trunk: nn.Module, dim: int = CONCH_POOL_DIM, heads: int = CONCH_POOL_HEADS):
        super().__init__()
        if not hasattr(trunk, "forward_features") or not hasattr(trunk, "num_prefix_tokens"):
            raise InputError(f"--encoder.pooling attn_pool needs a timm ViT; {type(trunk).__name__} has no tokens")
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(dim, int(trunk.num_features), heads=heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(dim)
        self.num_features = dim
        self.pretrained_cfg = getattr(trunk, "pretrained_cfg", {})

    @property
    def patch_embed(self) -> nn.Module | None:
        """The trunk's, for the input size (a property: registering it again would duplicate its weights)."""
        return getattr(self.trunk, "patch_embed", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])
