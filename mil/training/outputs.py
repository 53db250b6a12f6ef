"""What a run leaves in its directory, written by callbacks so every subcommand writes the same files.

- ``versions.json``: library versions and the device, so a number can be traced to the software behind it.
- ``predictions_<split>.csv`` and ``predictions.csv`` (the last split evaluated): ``slide_id,label,score,split``
  plus ``prob_<c>`` per class for multi-class models. ``score`` is the tumor probability (1 - P(class 0)).
- ``patch_scores/<slide_id>.h5`` (test and predict): ``coords`` (N, 2), ``scores`` (N,) the model's tumor logit
  per patch in the features file's row order, and ``attention`` (N,) where the model has one.

Nothing is written during the validation passes inside ``fit``: those files come from the best checkpoint,
evaluated once training ends.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from features.provenance import versions
from features.store import atomic_path
from mil.patch_scores import write_patch_scores


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_run_metrics(run_dir: Path) -> dict | None:
    """Slide metrics from the predictions CSVs, by ``mil.evaluation.report`` (absent: warn, return None)."""
    if importlib.util.find_spec("mil.evaluation.report") is None:
        warnings.warn("mil.evaluation.report is not installed; metrics.json not written", stacklevel=2)
        return None
    from mil.evaluation.report import write_run_metrics as write

    return write(Path(run_dir))


class RunOutputs(Callback):
    """Collects per-slide predictions of validate/test/predict and writes them, plus per-patch scores."""

    STAGE_SPLIT = {"validate": "val", "test": "test"}

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @rank_zero_only
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        write_json(Path(trainer.default_root_dir) / "versions.json", versions())

    def _active(self, trainer: Trainer) -> bool:
        return trainer.state.fn != "fit" and not trainer.sanity_checking

    def _split(self, trainer: Trainer) -> str:
        if trainer.state.fn == "predict":
            return getattr(trainer.datamodule, "predict_split", "all")
        return self.STAGE_SPLIT[str(trainer.state.fn.value)]

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    on_test_epoch_start = on_validation_epoch_start
    on_predict_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer):
            self._collect(trainer, outputs, patches=False)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, patches=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, patches=True)

    def _collect(self, trainer: Trainer, outputs: dict, patches: bool) -> None:
        datamodule = trainer.datamodule
        for row, slide_id in enumerate(outputs["slide_id"]):
            probs = outputs["probs"][row]
            record = {"slide_id": slide_id, "label": int(outputs["label"][row]), "score": float(1 - probs[0]),
                      "split": datamodule.split_of_slide(slide_id) if hasattr(datamodule, "split_of_slide") else ""}
            if len(probs) > 2:
                record.update({f"prob_{c}": float(p) for c, p in enumerate(probs)})
            self.rows.append(record)
            if patches:
                self._write_patch_scores(Path(trainer.default_root_dir), outputs, row, slide_id,
                                         getattr(datamodule, "feature_settings", None))

    @staticmethod
    def _write_patch_scores(run_dir: Path, outputs: dict, row: int, slide_id: str,
                            feature_settings: dict | None) -> None:
        valid = outputs["mask"][row]
        attention = outputs["attention"]
        write_patch_scores(run_dir, slide_id, outputs["coords"][row][valid].numpy(),
                           outputs["instance_scores"][row][valid].numpy(),
                           None if attention is None else attention[row][valid].numpy(), feature_settings)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active(trainer):
            self._write_predictions(trainer)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_predictions(trainer)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_predictions(trainer)

    def _write_predictions(self, trainer: Trainer) -> None:
        rows = gather_rows(self.rows)  # collective: every rank calls it; rank 0 writes
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        # A distributed sampler pads the last shard with repeats; a slide counts once.
        table = pd.DataFrame(rows).drop_duplicates("slide_id", keep="last")
        for name in (f"predictions_{self._split(trainer)}.csv", "predictions.csv"):
            with atomic_path(run_dir / name) as tmp:
                table.to_csv(tmp, index=False)


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's prediction rows (each rank scored its own shard of slides); the rows as given on one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list[list[dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in (part or [])]
