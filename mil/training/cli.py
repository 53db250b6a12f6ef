"""``mil fit|validate|test|predict``: LightningCLI over ``MILModule`` and ``MILDataModule``.

A run is one directory (``--trainer.default_root_dir``, default ``runs/mil``) holding the resolved config
(``config.yaml``; ``config_<subcommand>.yaml`` for later subcommands), ``checkpoints/``, W&B (offline) and CSV
logs, ``versions.json``, predictions, patch scores and ``metrics.json``. The data module's ``feature_dim`` and
``num_classes`` are linked into the aggregator, so a config names a model without knowing the encoder.

After ``fit`` the best checkpoint (by ``val_auc``) is evaluated on the validation split, and on the test split
when there is one, and ``fit_summary.json`` marks the run finished: running the same ``fit`` again skips it.
``validate``, ``test`` and ``predict`` default to that best checkpoint when ``--ckpt_path`` is not given.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from features.errors import InputError
from mil.data.datamodule import MILDataModule
from mil.training.module import MILModule
from mil.training.outputs import RunOutputs, write_json, write_run_metrics

DEFAULT_ROOT = "runs/mil"
SUMMARY = "fit_summary.json"


class _AlreadyFinished(Exception):
    """Raised before any work when the run directory already holds a finished fit."""


class MILCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val_auc", "checkpoint.mode": "max", "checkpoint.save_last": True,
                             "checkpoint.filename": "best-epoch{epoch:03d}-auc{val_auc:.4f}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val_auc", "early_stopping.mode": "max",
                             "early_stopping.patience": 10})
        parser.link_arguments("data.feature_dim", "model.aggregator.init_args.in_dim", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.aggregator.init_args.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        root = Path(config.trainer.default_root_dir or DEFAULT_ROOT)
        config.trainer.default_root_dir = str(root)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / "checkpoints")
        summary = root / SUMMARY
        if self.subcommand == "fit" and summary.is_file():
            raise _AlreadyFinished(f"{root}: fit already finished ({summary}); skipping. Delete it to train again")
        if self.subcommand != "fit" and config.ckpt_path is None:
            config.ckpt_path = best_checkpoint(root)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer")
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = False if self.subcommand == "predict" else default_loggers(
                Path(trainer_config["default_root_dir"]))
        return super().instantiate_trainer(**kwargs)

    def _weights_only(self) -> dict:
        """Checkpoints hold tensors and plain values only, so load them without unpickling code."""
        return {"weights_only": True} if "weights_only" in inspect.signature(Trainer.test).parameters else {}

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand != "fit" and kwargs.get("ckpt_path"):
            kwargs.update(self._weights_only())
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # predictions go to files, so memory stays flat
        return kwargs

    def after_fit(self) -> None:
        trainer, root = self.trainer, Path(self.trainer.default_root_dir)
        if trainer.interrupted:  # not finished: no summary, so the same command trains again
            return
        best = trainer.checkpoint_callback.best_model_path or None
        extra = self._weights_only() if best else {}
        val = trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False, **extra)
        if self.datamodule.items("test"):
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False, **extra)
        metrics = write_run_metrics(root) if trainer.is_global_zero else None
        if trainer.is_global_zero:
            score = trainer.checkpoint_callback.best_model_score
            write_json(root / SUMMARY, {
                "best_checkpoint": best, "best_val_auc": None if score is None else float(score),
                "epochs": trainer.current_epoch, "val": val[0] if val else {}, "metrics": metrics or {},
            })

    def after_validate(self) -> None:
        self._metrics()

    def after_test(self) -> None:
        self._metrics()

    def _metrics(self) -> None:
        if self.trainer.is_global_zero:
            write_run_metrics(Path(self.trainer.default_root_dir))


def best_checkpoint(root: Path) -> str:
    """The best checkpoint recorded by a finished fit in ``root``."""
    summary = root / SUMMARY
    if not summary.is_file():
        raise InputError(f"{root}: no finished fit here ({SUMMARY} missing); pass --ckpt_path or the run's "
                         "--trainer.default_root_dir")
    best = json.loads(summary.read_text()).get("best_checkpoint")
    if not best or not Path(best).is_file():
        raise InputError(f"{summary}: best checkpoint {best!r} not found; pass --ckpt_path")
    return best


def default_loggers(root: Path) -> list[Logger]:
    """W&B in offline mode (no account needed; ``wandb sync`` later) first, so the config lands in ``root``."""
    os.environ.setdefault("WANDB_MODE", "offline")
    root.mkdir(parents=True, exist_ok=True)
    wandb = WandbLogger(save_dir=str(root), offline=True, project="hnm-mil", name=root.name)
    wandb._wandb_init.pop("anonymous", None)  # Lightning passes a setting W&B deprecated; W&B warns on every run
    return [wandb, CSVLogger(save_dir=str(root), name="csv")]


def _run(subcommand: str, argv: list[str]) -> None:
    config_name = "config.yaml" if subcommand == "fit" else f"config_{subcommand}.yaml"
    # argv arrives explicitly from the `mil` dispatcher, which LightningCLI would otherwise warn about
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        MILCLI(
            MILModule,
            MILDataModule,
            args=[subcommand, *argv],
            seed_everything_default=0,
            trainer_defaults={
                "callbacks": [RunOutputs()],
                "max_epochs": 50,
                "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
                "log_every_n_steps": 10,
            },
            save_config_kwargs={"config_filename": config_name, "overwrite": True},
            parser_kwargs={"prog": f"mil {subcommand}"},
        )
    except _AlreadyFinished as done:
        print(done)


def fit(argv: list[str]) -> None:
    """Train a slide model; evaluate the best checkpoint on val (and test); write the run directory."""
    _run("fit", argv)


def validate(argv: list[str]) -> None:
    _run("validate", argv)


def test(argv: list[str]) -> None:
    _run("test", argv)


def predict(argv: list[str]) -> None:
    _run("predict", argv)
