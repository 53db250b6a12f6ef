"""DSMIL against the published architecture: same weights, same outputs; the published loss weighting and score.

The reference below restates, for one bag and without batching, what the authors' ``dsmil.py`` computes
(instance logits by one linear layer; critical instance = top instance logit per class; attention = softmax over
patches of q_i . q_critical / sqrt(|q|); bag vector = attention-weighted values; one Conv1d kernel per class).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mil.aggregators import DSMIL
from mil.aggregators.dsmil import from_published_state_dict

torch.set_num_threads(1)
DIM, CLASSES = 24, 1  # the authors' binary Camelyon16 model has one output


def published_weights(nonlinear: bool, passing_v: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict under the authors' parameter names and shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    weights = {"i_classifier.fc.0.weight": r(CLASSES, DIM), "i_classifier.fc.0.bias": r(CLASSES),
               "b_classifier.fcc.weight": r(CLASSES, CLASSES, DIM), "b_classifier.fcc.bias": r(CLASSES)}
    if nonlinear:
        weights |= {"b_classifier.q.0.weight": r(128, DIM), "b_classifier.q.0.bias": r(128),
                    "b_classifier.q.2.weight": r(128, 128), "b_classifier.q.2.bias": r(128)}
    else:
        weights |= {"b_classifier.q.weight": r(128, DIM), "b_classifier.q.bias": r(128)}
    if passing_v:
        weights |= {"b_classifier.v.1.weight": r(DIM, DIM), "b_classifier.v.1.bias": r(DIM)}
    return weights


def reference_forward(w: dict[str, torch.Tensor], feats: torch.Tensor, nonlinear: bool, passing_v: bool):
    """(instance logits N x C, bag logits 1 x C, attention N x C) as the published MILNet computes them."""
    classes = feats @ w["i_classifier.fc.0.weight"].T + w["i_classifier.fc.0.bias"]

    def query(x):
        if not nonlinear:
            return x @ w["b_classifier.q.weight"].T + w["b_classifier.q.bias"]
        hidden = F.relu(x @ w["b_classifier.q.0.weight"].T + w["b_classifier.q.0.bias"])
        return torch.tanh(hidden @ w["b_classifier.q.2.weight"].T + w["b_classifier.q.2.bias"])

    values = F.relu(feats @ w["b_classifier.v.1.weight"].T + w["b_classifier.v.1.bias"]) if passing_v else feats
    order = torch.sort(classes, 0, descending=True).indices
    critical = feats.index_select(0, order[0])  # C x K
    q_all, q_top = query(feats), query(critical)
    attention = torch.softmax(q_all @ q_top.T / math.sqrt(q_all.shape[1]), 0)  # N x C
    bag_vectors = attention.T @ values  # C x K
    bag = F.conv1d(bag_vectors[None], w["b_classifier.fcc.weight"], w["b_classifier.fcc.bias"]).view(1, -1)
    return classes, bag, attention


@pytest.mark.parametrize("nonlinear,passing_v", [(True, False), (False, True), (True, True)])
def test_same_weights_same_outputs_as_the_published_architecture(nonlinear, passing_v):
    weights = published_weights(nonlinear, passing_v)
    model = DSMIL(in_dim=DIM, nonlinear_query=nonlinear, passing_v=passing_v).eval()
    model.load_state_dict(from_published_state_dict(weights))
    feats = torch.randn(37, DIM, generator=torch.Generator().manual_seed(1))
    classes, bag, attention = reference_forward(weights, feats, nonlinear, passing_v)
    mask = torch.ones(1, 37, dtype=torch.bool)
    out = model(feats[None], mask)
    torch.testing.assert_close(out.instance_scores[0], classes[:, 0])
    torch.testing.assert_close(out.logits, bag)
    torch.testing.assert_close(out.attention[0], attention[:, 0])
    # the published Camelyon16 score: the mean of both streams' probabilities
    published = 0.5 * torch.sigmoid(classes.max(0).values) + 0.5 * torch.sigmoid(bag[0])
    torch.testing.assert_close(torch.sigmoid(model.slide_logits(out))[0], published)


def test_defaults_are_the_published_choices():
    model = DSMIL(in_dim=DIM)
    names = set(model.state_dict())
    assert names == set(from_published_state_dict(published_weights(nonlinear=True, passing_v=False)))
    assert isinstance(model.embed, torch.nn.Identity) and isinstance(model.value, torch.nn.Identity)


def test_loss_weights_both_streams_equally_as_published():
    """0.5 x bag + 0.5 x max-instance (authors) is our bag loss + 1.0 x max-instance, up to a factor Adam ignores."""
    model = DSMIL(in_dim=DIM)
    feats, labels = torch.randn(2, 11, DIM), torch.tensor([1, 0])
    out = model(feats, torch.ones(2, 11, dtype=torch.bool))
    bag = F.binary_cross_entropy_with_logits(out.logits[:, 0], labels.float())
    top = F.binary_cross_entropy_with_logits(out.instance_scores.max(1).values, labels.float())
    torch.testing.assert_close(bag + model.auxiliary_loss(out, labels), 2 * (0.5 * bag + 0.5 * top))


def test_unknown_published_key_is_refused():
    with pytest.raises(KeyError, match="not a DSMIL"):
        from_published_state_dict({"b_classifier.lin.weight": torch.zeros(1)})
