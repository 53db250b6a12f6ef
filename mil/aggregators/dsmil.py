"""DSMIL (Li, Li & Eliceiri, CVPR 2021) as its authors' code builds it, with our defaults equal to theirs.

Stream 1, the instance classifier, is one linear layer on each patch embedding; each class's top-scoring patch is
its "critical instance". Stream 2 scores every patch by the scaled dot product of its query with the critical
patch's query, softmax over the patches, pools the value vectors with those weights and classifies the pooled
vector with one weight vector per class (a Conv1d whose kernel spans the whole vector). Training minimises
``bag loss + instance_loss_weight x max-instance loss``; the authors weight both by 0.5, which under Adam is the
same as weight 1.0 here. The published slide score for Camelyon16 averages the probabilities of both streams
(``average_scores``).

Published choices, each an argument: queries are ``Linear-ReLU-Linear-Tanh`` to 128 dimensions
(``nonlinear_query``), values are the embeddings themselves (``passing_v=False``), and there is no projection
before the two streams (``embed_dim=None``). ``embed_dim`` adds the project's usual ``Linear-ReLU-Dropout``
projection in front of both streams, which older versions of this class always had.

Per-patch outputs: ``instance_scores`` are stream 1's tumor logits (what the max-instance loss trains, and what
mining reads); ``attention`` is stream 2's weights for the tumor class(es) (what the authors draw as heatmaps).
Stream 1 is trained only through each bag's single top patch, so its ranking of all the other patches is
unsupervised; docs/mil.md shows how that ranking can come out inverted while the slide calls are right.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mil.aggregators.base import Aggregator, AggregatorOutput, embedder, masked_max, masked_softmax, tumor_logit, zero_padding
from mil.losses.bag import classification_loss

# The authors' parameter names (``MILNet(FCLayer, BClassifier)``) -> ours; their layer indexes equal ours.
PUBLISHED_PREFIXES = {"i_classifier.fc.0.": "instance_classifier.", "b_classifier.q.": "query.",
                      "b_classifier.v.": "value.", "b_classifier.fcc.": "bag_classifier."}


class DSMIL(Aggregator):
    def __init__(self, in_dim: int, num_classes: int = 2, embed_dim: int | None = None, query_dim: int = 128,
                 nonlinear_query: bool = True, passing_v: bool = False, dropout_v: float = 0.0,
                 dropout: float = 0.0, instance_loss_weight: float = 1.0, average_scores: bool = True):
        """
        Args:
            in_dim: Embedding size of the stored features.
            num_classes: Number of slide classes (2 = one tumor logit).
            embed_dim: Size of a ``Linear-ReLU-Dropout`` projection before both streams; None = none (published).
            query_dim: Size of the queries (128 published).
            nonlinear_query: ``Linear-ReLU-Linear-Tanh`` queries (published default) instead of one linear layer.
            passing_v: Values through ``Dropout-Linear-ReLU`` instead of the embeddings themselves (published: off).
            dropout_v: Dropout before the value layer when ``passing_v``.
            dropout: Dropout of the optional projection.
            instance_loss_weight: Weight of the max-instance loss relative to the bag loss (published: equal).
            average_scores: Slide score = mean of both streams' probabilities, as published for Camelyon16.
        """
        super().__init__(in_dim, num_classes)
        size = embed_dim or in_dim
        self.embed = nn.Identity() if embed_dim is None else embedder(in_dim, embed_dim, dropout)
        self.instance_classifier = nn.Linear(size, self.n_outputs)
        self.query = (nn.Sequential(nn.Linear(size, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
                      if nonlinear_query else nn.Linear(size, query_dim))
        self.value = (nn.Sequential(nn.Dropout(dropout_v), nn.Linear(size, size), nn.ReLU())
                      if passing_v else nn.Identity())
        self.bag_classifier = nn.Conv1d(self.n_outputs, self.n_outputs, kernel_size=size)
        self.instance_loss_weight = instance_loss_weight
        self.average_scores = average_scores

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
        tumor_attention = attention[..., 0] if self.n_outputs == 1 else attention[..., 1:].mean(-1)
        return AggregatorOutput(
            logits=logits,
            instance_scores=zero_padding(tumor_logit(instance_logits), mask),
            attention=zero_padding(tumor_attention, mask),
            extras={"max_instance_logits": max_logits},
        )

    def auxiliary_loss(self, output: AggregatorOutput, labels: Tensor) -> Tensor | None:
        return self.instance_loss_weight * classification_loss(output.extras["max_instance_logits"].float(), labels)

    def slide_logits(self, output: AggregatorOutput) -> Tensor:
        """The published score: both streams' probabilities averaged (binary: sigmoid; else softmax), as logits."""
        if not self.average_scores:
            return output.logits
        bag, top = output.logits.float(), output.extras["max_instance_logits"].float()
        if bag.shape[-1] == 1:
            return torch.logit((torch.sigmoid(bag) + torch.sigmoid(top)) / 2, eps=1e-7)
        return torch.log((torch.softmax(bag, -1) + torch.softmax(top, -1)) / 2)


def from_published_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a state dict saved by the authors' training scripts so ``DSMIL.load_state_dict`` takes it.

    Their checkpoints are plain state dicts: load them with ``torch.load(path, weights_only=True)`` first.
    """
    renamed = {}
    for key, value in state_dict.items():
        prefix = next((p for p in PUBLISHED_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"{key!r} is not a DSMIL (MILNet) parameter; expected one of {list(PUBLISHED_PREFIXES)}")
        renamed[PUBLISHED_PREFIXES[prefix] + key[len(prefix):]] = value
    return renamed
