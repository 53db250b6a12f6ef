"""Every aggregator: shapes for binary and multi-class, padding never matters, gradients reach every part."""

from __future__ import annotations

import pytest
import torch

from mil.aggregators import ABMIL, CLAMSB, DSMIL, MaxPool, MeanPool, TransMIL

ALL = [MeanPool, MaxPool, ABMIL, DSMIL, CLAMSB, TransMIL]
torch.set_num_threads(1)


def _batch(dim: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(3, 9, dim)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    return x, mask


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("num_classes", [2, 4])
def test_shapes_and_padding_invariance(cls, num_classes):
    model = cls(in_dim=12, num_classes=num_classes).eval()
    x, mask = _batch()
    out = model(x, mask)
    assert out.logits.shape == (3, 1 if num_classes == 2 else num_classes)
    assert out.instance_scores.shape == (3, 9)
    assert out.attention is None or out.attention.shape == (3, 9)
    garbage = x.clone()
    garbage[~mask] = 1e4  # padded patches hold anything
    again = model(garbage, mask)
    torch.testing.assert_close(again.logits, out.logits)
    torch.testing.assert_close(again.instance_scores, out.instance_scores)
    assert (again.instance_scores[~mask] == 0).all()
    # a bag alone gives the same answer as in a padded batch
    alone = model(x[2:3, :2], mask[2:3, :2])
    torch.testing.assert_close(alone.logits, out.logits[2:3])
    torch.testing.assert_close(alone.instance_scores, out.instance_scores[2:3, :2])


@pytest.mark.parametrize("cls", ALL)
def test_trains_end_to_end(cls):
    model = cls(in_dim=12, num_classes=2).train()
    x, mask = _batch()
    labels = torch.tensor([1, 0, 1])
    out = model(x, mask)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[:, 0], labels.float())
    auxiliary = model.auxiliary_loss(out, labels)
    if cls in (DSMIL, CLAMSB):
        assert auxiliary is not None and auxiliary > 0
        loss = loss + auxiliary
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_abmil_bag_logit_is_attention_weighted_instance_logit():
    model = ABMIL(in_dim=12, num_classes=2).eval()
    x, mask = _batch()
    out = model(x, mask)
    weighted = (out.attention * out.instance_scores).sum(1)
    torch.testing.assert_close(weighted, out.logits[:, 0])
    torch.testing.assert_close(out.attention.sum(1), torch.ones(3))


def test_max_pool_picks_the_planted_patch():
    # Patch logit = relu(feature 0): plant one strong patch per bag at a known position, and a stronger value in
    # bag 1's padding that must be ignored. The bag logit is the planted patch's logit, nothing else.
    model = MaxPool(in_dim=12, num_classes=2, dropout=0.0).eval()
    with torch.no_grad():
        first, last = model.embed[0], model.classifier
        first.weight.zero_(), first.bias.zero_(), last.weight.zero_(), last.bias.zero_()
        first.weight[0, 0] = 1.0
        last.weight[0, 0] = 1.0
    x, mask = _batch()
    x[..., 0] = x[..., 0].clamp(-1.0, 1.0)  # background patches score at most 1
    planted = {0: (7, 5.0), 1: (3, 8.0), 2: (1, 6.0)}
    for bag, (row, value) in planted.items():
        x[bag, row, 0] = value
    x[1, 8, 0] = 100.0  # padding (bag 1 has 5 valid patches)
    out = model(x, mask)
    torch.testing.assert_close(out.logits[:, 0], torch.tensor([v for _, v in planted.values()]))
    assert out.instance_scores.argmax(1).tolist() == [row for row, _ in planted.values()]
    torch.testing.assert_close(out.logits[:, 0], out.instance_scores.masked_fill(~mask, -1e9).max(1).values)


def test_clam_instance_loss_handles_tiny_bags():
    model = CLAMSB(in_dim=12, num_classes=2, k_sample=8)
    x, mask = torch.randn(1, 1, 12), torch.ones(1, 1, dtype=torch.bool)
    assert model.auxiliary_loss(model(x, mask), torch.tensor([1])) is None  # one patch: no top/bottom sets
