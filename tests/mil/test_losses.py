"""The patch-wise ranking loss against hand-computed values, and the combined bag objective."""

from __future__ import annotations

import math

import pytest
import torch

from mil.aggregators.base import AggregatorOutput
from mil.losses import BagLoss, patch_ranking_loss, top_k_mean


def test_ranking_one_pair_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0, -5.0], [0.5, 2.5, -1.0, 0.0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    labels = torch.tensor([1, 0])
    # top-2 means: positive (3 + 2) / 2 = 2.5, negative (2.5 + 0.5) / 2 = 1.5 -> max(0, 1 - 2.5 + 1.5) = 0
    assert patch_ranking_loss(scores, mask, labels, k=2, margin=1.0).item() == pytest.approx(0.0)
    # margin 2 -> max(0, 2 - 2.5 + 1.5) = 1
    assert patch_ranking_loss(scores, mask, labels, k=2, margin=2.0).item() == pytest.approx(1.0)


def test_ranking_all_pairs_mean_and_small_bags_and_padding():
    scores = torch.tensor([
        [4.0, 0.0, 99.0],   # tumor, 2 valid patches (99 is padding)
        [1.0, 0.0, 0.0],    # tumor, 1 valid patch
        [2.0, 1.0, 3.0],    # normal, 3 valid
    ])
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    labels = torch.tensor([1, 2, 0])  # class 2 counts as tumor too
    k = 10  # larger than every bag: k_eff = n_valid
    means = top_k_mean(scores, mask, k)
    torch.testing.assert_close(means, torch.tensor([2.0, 1.0, 2.0]))
    expected = (max(0, 1 - 2.0 + 2.0) + max(0, 1 - 1.0 + 2.0)) / 2
    assert patch_ranking_loss(scores, mask, labels, k=k).item() == pytest.approx(expected)


def test_ranking_without_pairs_is_zero_with_a_gradient():
    scores = torch.randn(3, 5, requires_grad=True)
    loss = patch_ranking_loss(scores, torch.ones(3, 5, dtype=torch.bool), torch.tensor([1, 1, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() == 0


def test_ranking_gradient_pushes_hard_negatives_down():
    scores = torch.tensor([[0.0, 0.0], [0.5, -3.0]], requires_grad=True)
    patch_ranking_loss(scores, torch.ones(2, 2, dtype=torch.bool), torch.tensor([1, 0]), k=1).backward()
    assert scores.grad[1, 0] > 0 and scores.grad[1, 1] == 0 and scores.grad[0].sum() < 0


def _bce(z: float, y: int, w: float) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))


def test_bag_loss_combines_weighted_terms_with_a_positive_hinge():
    # The normal slide's top patch (2.0) outscores the tumor slide's (1.0): the ranking hinge is 1 - 1 + 2 = 2,
    # so leaving the ranking term out of the total changes it by 0.1 x 2.
    logits = torch.tensor([[2.0], [-1.0]])
    scores = torch.tensor([[1.0, -3.0], [2.0, -2.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    labels = torch.tensor([1, 0])
    loss = BagLoss(pos_weight=2.0, bag_weight=0.5, max_instance_weight=0.5, ranking_weight=0.1, ranking_k=1)
    terms = loss(AggregatorOutput(logits, scores), mask, labels)
    bag = (_bce(2.0, 1, 2.0) + _bce(-1.0, 0, 2.0)) / 2
    top = (_bce(1.0, 1, 2.0) + _bce(2.0, 0, 2.0)) / 2
    rank = max(0.0, 1 - 1.0 + 2.0)
    assert rank > 0
    assert terms["bag"].item() == pytest.approx(bag, rel=1e-5)
    assert terms["max_instance"].item() == pytest.approx(top, rel=1e-5)
    assert terms["ranking"].item() == pytest.approx(rank, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.5 * bag + 0.5 * top + 0.1 * rank, rel=1e-5)


def test_total_loss_gradient_carries_the_ranking_term():
    # Through the total loss, the ranking weight must push the normal slide's top patch down and the tumor
    # slide's top patch up, by exactly ranking_weight / number of pairs; bottom patches get nothing from it.
    scores = torch.tensor([[1.0, -3.0], [2.0, -2.0]], requires_grad=True)
    logits = torch.zeros(2, 1)
    mask = torch.ones(2, 2, dtype=torch.bool)
    labels = torch.tensor([1, 0])
    with_rank = BagLoss(pos_weight=None, ranking_weight=0.5, ranking_k=1)
    with_rank(AggregatorOutput(logits, scores), mask, labels)["loss"].backward()
    torch.testing.assert_close(scores.grad, torch.tensor([[-0.5, 0.0], [0.5, 0.0]]))


def test_ranking_term_is_averaged_over_every_pair_in_the_total():
    # two tumor and two normal slides, k = 1: hinges 1-1+2=2, 1-1+0=0, 1-3+2=0, 1-3+0=0 -> mean 0.5
    scores = torch.tensor([[1.0], [3.0], [2.0], [0.0]])
    labels = torch.tensor([1, 1, 0, 0])
    terms = BagLoss(pos_weight=None, bag_weight=0.0, ranking_weight=2.0, ranking_k=1, ranking_margin=1.0)(
        AggregatorOutput(torch.zeros(4, 1), scores), torch.ones(4, 1, dtype=torch.bool), labels)
    assert terms["ranking"].item() == pytest.approx(0.5)
    assert terms["loss"].item() == pytest.approx(2.0 * 0.5)
    # the configured margin reaches the hinge: margin 3 -> 4, 2, 2, 0 -> mean 2
    wide = BagLoss(pos_weight=None, bag_weight=0.0, ranking_weight=1.0, ranking_k=1, ranking_margin=3.0)(
        AggregatorOutput(torch.zeros(4, 1), scores), torch.ones(4, 1, dtype=torch.bool), labels)
    assert wide["ranking"].item() == pytest.approx(2.0)


def test_auto_pos_weight_and_multiclass():
    loss = BagLoss()
    loss.set_auto_pos_weight(3.0)
    assert loss.pos_weight.item() == 3.0
    multi = BagLoss(pos_weight=None)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    terms = multi(AggregatorOutput(logits, torch.zeros(1, 2)), torch.ones(1, 2, dtype=torch.bool), torch.tensor([0]))
    assert terms["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([0])).item())


def test_defaults_are_the_paper_settings_and_a_plain_bag_loss():
    # Defaults: no ranking or max-instance term unless configured, k = 10 and margin 1 as in HNM-WSI.
    logits, labels = torch.tensor([[1.5], [-0.5]]), torch.tensor([1, 0])
    scores = torch.arange(24, dtype=torch.float32).reshape(2, 12) * torch.tensor([[1.0], [0.5]])
    mask = torch.ones(2, 12, dtype=torch.bool)
    terms = BagLoss()(AggregatorOutput(logits, scores), mask, labels)
    assert set(terms) == {"bag", "loss"} and terms["loss"].item() == pytest.approx(terms["bag"].item())
    ranked = BagLoss(ranking_weight=1.0)(AggregatorOutput(logits, scores), mask, labels)["ranking"]
    top10 = (scores[0, 2:].mean(), scores[1, 2:].mean())  # 12 distinct scores per bag: the top 10 drop 2
    expected = max(0.0, 1.0 - top10[0].item() + top10[1].item())
    assert ranked.item() == pytest.approx(expected)
    assert patch_ranking_loss(scores, mask, labels).item() == pytest.approx(expected)


def test_pos_weight_settings():
    assert BagLoss().pos_weight.item() == 1.0  # "auto" before the data module sets it: unweighted
    fixed = BagLoss(pos_weight=2.5)
    fixed.set_auto_pos_weight(7.0)  # a number given by the user is never overridden
    assert fixed.pos_weight.item() == 2.5
    off = BagLoss(pos_weight=None)
    off.set_auto_pos_weight(7.0)
    logits, labels = torch.tensor([[0.3]]), torch.tensor([1])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
    assert off(AggregatorOutput(logits, torch.zeros(1, 1)), torch.ones(1, 1, dtype=torch.bool), labels)[
        "loss"].item() == pytest.approx(plain.item())
    with pytest.raises(ValueError, match="pos_weight must be 'auto'"):
        BagLoss(pos_weight="balanced")
