"""``MILModule``: any aggregator plus the bag objective, with one step shared by train, val, test and predict.

Each step returns the per-slide scores and per-patch scores it computed, so the run-directory callbacks
(``mil.training.outputs``) write predictions and patch scores without a second pass. ``val_auc`` is what
checkpointing and early stopping watch.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics.classification import BinaryAUROC, MulticlassAUROC

from mil.aggregators.base import Aggregator, AggregatorOutput, masked_max
from mil.data.bags import feature_statistics
from mil.losses.bag import BagLoss


def _built_from_config() -> bool:
    """True while LightningCLI (or ``load_from_checkpoint`` of a CLI-made checkpoint) instantiates the module."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # an older Lightning: no config-as-hyper-parameters; keep modules out of the checkpoint
        return False
    return _given_hyperparameters.get() is not None


class MILModule(LightningModule):
    def __init__(self, aggregator: Aggregator, loss: BagLoss | None = None, lr: float = 2e-4,
                 weight_decay: float = 1e-4, scheduler: Literal["cosine", "none"] = "cosine", standardize: bool = True,
                 slide_score: Literal["bag", "bag_and_top_patch"] = "bag"):
        """
        Args:
            aggregator: The slide model (``class_path`` of any ``mil.aggregators`` class).
            loss: The objective; default bag BCE/CE with pos_weight from the training split.
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            scheduler: Cosine decay over ``trainer.max_epochs``, or a constant rate.
            standardize: Z-score each feature dimension with training-split statistics (kept in the checkpoint).
            slide_score: What the slide probabilities written to predictions are: the bag head's, or the mean of
                the bag logit and the slide's top patch logit (the two things the bag and max-instance loss terms
                train against the slide label). Binary tasks only. ``val_auc``, which checkpointing and early
                stopping watch, stays the bag head's either way, so the epoch kept (and what mining reads) is
                the same.
        """
        super().__init__()
        if slide_score != "bag" and aggregator.num_classes != 2:
            raise ValueError(f"slide_score={slide_score!r} needs a binary task (one tumor logit); this aggregator has "
                             f"{aggregator.num_classes} classes: use slide_score='bag'")
        # Built by the CLI, the hyper-parameters are the config (class_path/init_args), so the checkpoint alone
        # rebuilds the model (``MILModule.load_from_checkpoint(path)``) and the loggers record it; built in Python,
        # the modules themselves are left out (the state dict already holds them, and pickles are never saved).
        self.save_hyperparameters(ignore=[] if _built_from_config() else ["aggregator", "loss"])
        self.aggregator = aggregator
        self.loss = loss or BagLoss()
        self.lr, self.weight_decay, self.scheduler = lr, weight_decay, scheduler
        make_auc = (lambda: BinaryAUROC()) if aggregator.n_outputs == 1 else (
            lambda: MulticlassAUROC(num_classes=aggregator.num_classes))
        self.auc = torch.nn.ModuleDict({f"{stage}_auc": make_auc() for stage in ("train", "val", "test")})
        self.standardize = standardize
        self.slide_score = slide_score
        # Buffers, so the statistics fitted on the training split travel with every checkpoint.
        self.register_buffer("feature_mean", torch.zeros(aggregator.in_dim))
        self.register_buffer("feature_std", torch.ones(aggregator.in_dim))
        self.register_buffer("statistics_fitted", torch.tensor(False))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.loss.set_auto_pos_weight(getattr(datamodule, "pos_weight", None))
        if stage == "fit" and self.standardize and not bool(self.statistics_fitted) and hasattr(datamodule, "items"):
            mean, std = feature_statistics(datamodule.items("train"))
            self.feature_mean.copy_(torch.from_numpy(mean))
            self.feature_std.copy_(torch.from_numpy(std))
            self.statistics_fitted.fill_(True)

    def forward(self, features: Tensor, mask: Tensor) -> AggregatorOutput:
        if self.standardize:
            features = (features - self.feature_mean) / self.feature_std * mask.unsqueeze(-1)
        return self.aggregator(features, mask)

    def probabilities(self, logits: Tensor) -> Tensor:
        """(B, C) class probabilities; binary models get [1 - p, p] from their single tumor logit."""
        logits = logits.float()
        if logits.shape[1] == 1:
            tumor = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - tumor, tumor], dim=1)
        return torch.softmax(logits, dim=1)

    def _step(self, batch: dict, stage: str) -> dict:
        output = self(batch["features"], batch["mask"])
        labels = batch["label"]
        if stage == "predict":
            return self._results(batch, output)
        # Training batches write nothing: copying their patch scores to the CPU would stall a GPU every step.
        results = {} if stage == "train" else self._results(batch, output)
        terms = self.loss(output, batch["mask"], labels)
        auxiliary = self.aggregator.auxiliary_loss(output, labels)
        if auxiliary is not None:
            terms["auxiliary"] = auxiliary
            terms["loss"] = terms["loss"] + auxiliary
        size = len(labels)
        self.log_dict({f"{stage}_{name}": value.detach() for name, value in terms.items()}, batch_size=size,
                      on_step=False, on_epoch=True)
        if self._trainer is not None and self._trainer.sanity_checking:
            # Lightning's sanity check reads a couple of validation slides, often of one class; an AUC of them is
            # meaningless (torchmetrics warns) and nothing is chosen on it.
            return {"loss": terms["loss"], **results}
        probs = self.probabilities(self.aggregator.slide_logits(output).detach())  # the bag head: what selection watches
        self.auc[f"{stage}_auc"].update(probs[:, 1] if probs.shape[1] == 2 else probs, labels)
        self.log(f"{stage}_auc", self.auc[f"{stage}_auc"], on_step=False, on_epoch=True, batch_size=size, prog_bar=stage == "val")
        return {"loss": terms["loss"], **results}

    def slide_logits(self, output: AggregatorOutput, mask: Tensor) -> Tensor:
        """(B, C) logits that the written slide probabilities come from (``slide_score``)."""
        logits = self.aggregator.slide_logits(output)
        if self.slide_score == "bag":
            return logits
        top_patch = masked_max(output.instance_scores, mask)[0]
        return (logits + top_patch.unsqueeze(1)) / 2

    def _results(self, batch: dict, output: AggregatorOutput) -> dict:
        """Per-slide probabilities and per-patch scores, detached on the CPU, for writing to the run directory."""
        probs = self.probabilities(self.slide_logits(output, batch["mask"]).detach()).cpu()
        return {
            "slide_id": batch["slide_id"],
            "label": batch["label"].cpu(),
            "probs": probs,
            "mask": batch["mask"].cpu(),
            "coords": batch["coords"].cpu(),
            "instance_scores": output.instance_scores.detach().float().cpu(),
            "attention": None if output.attention is None else output.attention.detach().float().cpu(),
        }

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return self._step(batch, "predict")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler == "none" or not self.trainer.max_epochs or self.trainer.max_epochs < 1:
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}
