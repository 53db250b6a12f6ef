"""The patch-wise ranking loss of HNM-WSI (Huang et al., MICCAI 2024, arXiv:2410.02212).

For one tumor slide P and one normal slide N with raw per-patch tumor logits s_P and s_N::

    rank(P, N) = max(0, margin - mean(top_k(s_P)) + mean(top_k(s_N)))

with k = 10 and margin = 1 as in the authors' code: the k most tumor-like patches of a tumor slide must score
at least ``margin`` above the k most tumor-like patches of a normal slide. Because the normal slide's top
patches are its hardest negatives, the loss pushes those down directly, which is the point of the method.

How this generalises the paper's one-pair-per-step setting:

- a batch holds any number of slides; the loss is the mean over every (tumor, normal) pair in it, and 0 (with a
  gradient path, so mixed-precision scalers are happy) when the batch has no pair;
- a bag with fewer than k valid patches uses k_eff = min(k, n_valid) of its own patches;
- padded patches (mask False) are never among the top k;
- "tumor" means label > 0, so multi-class tasks rank every non-normal class above normal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_k_mean(scores: Tensor, mask: Tensor, k: int) -> Tensor:
    """Mean of each bag's ``min(k, n_valid)`` highest valid scores: (B, N) -> (B,)."""
    n_valid = mask.sum(dim=1).clamp_min(1)
    k_max = min(k, scores.shape[1])
    top = scores.masked_fill(~mask, float("-inf")).topk(k_max, dim=1).values
    keep = torch.arange(k_max, device=scores.device)[None, :] < n_valid.clamp_max(k)[:, None]
    return top.masked_fill(~keep, 0.0).sum(dim=1) / keep.sum(dim=1)


def patch_ranking_loss(instance_scores: Tensor, mask: Tensor, labels: Tensor, k: int = 10,
                       margin: float = 1.0) -> Tensor:
    """Mean hinge over all (tumor, normal) bag pairs in the batch; 0 when there is no pair."""
    positive, negative = labels > 0, labels == 0
    if not positive.any() or not negative.any():
        return instance_scores.sum() * 0.0
    means = top_k_mean(instance_scores, mask, k)
    gaps = margin - means[positive][:, None] + means[negative][None, :]
    return gaps.clamp_min(0.0).mean()
