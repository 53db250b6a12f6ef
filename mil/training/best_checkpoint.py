"""Keep the best epoch by validation AUC, optionally breaking ties with the validation loss.

With a handful of validation slides, AUC takes few values and often reaches 1.0 in the first epoch or two.
Lightning's ModelCheckpoint keeps the first epoch that reached the best score, so on demo-sized cohorts 56 of 80
fits of 30 epochs kept epoch 0 or 1. ``tie_breaker="val_loss"`` keeps the tied epoch with the lowest loss instead.
It is not the default because, measured, it helps some runs and hurts others (docs/method.md). Either way the
callback remembers each epoch's score, so a fit can say when validation did not choose its epoch (:func:`tied_epochs`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ties on ``monitor`` go to the epoch with the lower ``tie_breaker`` (one best file)."""

    def __init__(self, *args: Any, tie_breaker: str | None = None, **kwargs: Any):
        """
        Args:
            tie_breaker: Logged metric (lower is better) that decides between epochs with equal ``monitor``
                values; None keeps the first such epoch, as ModelCheckpoint does. Used only with save_top_k 1.
        """
        super().__init__(*args, **kwargs)
        self.tie_breaker = tie_breaker
        self.best_tie_value: float | None = None
        self.score_by_epoch: dict[int, float] = {}
        self.best_epoch: int | None = None

    def _tie_value(self, trainer: L.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.tie_breaker) if self.tie_breaker else None
        return None if value is None or not torch.isfinite(torch.as_tensor(value)) else float(value)

    def check_monitor_top_k(self, trainer: L.Trainer, current: Tensor | None = None) -> bool:
        if super().check_monitor_top_k(trainer, current):
            return True
        if current is None or self.save_top_k != 1 or not self.best_k_models or self.best_tie_value is None:
            return False
        tie = self._tie_value(trainer)
        better = (bool(torch.eq(current, self.best_k_models[self.kth_best_model_path]))
                  and tie is not None and tie < self.best_tie_value)
        return trainer.strategy.reduce_boolean_decision(better)

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        value = monitor_candidates.get(self.monitor) if self.monitor else None
        if value is not None and torch.isfinite(torch.as_tensor(value)):
            self.score_by_epoch[int(trainer.current_epoch)] = float(value)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _update_best_and_save(self, current: Tensor, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        self.best_tie_value = self._tie_value(trainer)
        self.best_epoch = int(trainer.current_epoch)
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def tied_epochs(self) -> list[int]:
        """The epochs whose score equals the kept epoch's: more than one means the score did not choose the epoch."""
        if self.best_epoch is None or self.best_epoch not in self.score_by_epoch:
            return []
        best = self.score_by_epoch[self.best_epoch]
        return sorted(epoch for epoch, score in self.score_by_epoch.items() if math.isclose(score, best, abs_tol=1e-9))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_tie_value": self.best_tie_value,
                "score_by_epoch": dict(self.score_by_epoch), "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_tie_value = state_dict.get("best_tie_value")
        self.score_by_epoch = {int(k): float(v) for k, v in (state_dict.get("score_by_epoch") or {}).items()}
        self.best_epoch = state_dict.get("best_epoch")
