"""``mil fit|validate|test|predict``: LightningCLI over ``MILModule`` and ``MILDataModule``.

A run is one directory (``--trainer.default_root_dir``, default ``runs/mil``) holding the resolved config
(``config.yaml``; ``config_<subcommand>.yaml`` for later subcommands), ``checkpoints/``, W&B (offline) and CSV
logs, ``versions.json``, predictions, patch scores and ``metrics.json``. The data module's ``feature_dim`` and
``num_classes`` are linked into the aggregator, so a config names a model without knowing the encoder.

Checkpoints: ``checkpoints/best-*.ckpt`` is the best epoch by ``val_auc`` (``--checkpoint.tie_breaker`` decides
ties); ``checkpoints/last.ckpt`` is the last finished epoch (rewritten after every validation), so ``--ckpt_path
last`` resumes where a run stopped. Both carry the hyper-parameters (the config), so
``MILModule.load_from_checkpoint(path)`` needs no YAML. The checkpoint folder is derived from
``--trainer.default_root_dir`` at run time and never written into ``config.yaml``, so a saved config rerun
elsewhere writes there.

After ``fit`` the best checkpoint is evaluated on the validation split, and on the test split when there is one,
and ``fit_summary.json`` marks the run finished: running the same ``fit`` again skips it, an unfinished one
resumes from ``last.ckpt``, and ``--ckpt_path last --trainer.max_epochs N`` continues a finished one. A rerun
with other model or data settings than the run's ``config.yaml`` is refused. ``validate``, ``test`` and
``predict`` default to the best checkpoint of the run (the ``--config`` file's folder, else
``--trainer.default_root_dir``) when ``--ckpt_path`` is not given.

Every checkpoint is loaded with ``weights_only=True``; a missing, unreadable or pickled one, a YAML syntax error
and a config error each end in one line (exit 2) instead of a traceback or the full usage.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from argparse import ArgumentError
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from features.errors import InputError, fail
from features.provenance import refuse_other_features
from features.store import folder_settings
from mil.data.datamodule import FEATURES_FIX, MILDataModule
from mil.training.best_checkpoint import BestCheckpoint
from mil.training.command import MILCommand, read_config
from mil.training.module import MILModule
from mil.training.outputs import RunOutputs, write_json, write_run_metrics

DEFAULT_ROOT = "runs/mil"
SUMMARY = "fit_summary.json"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
SETTINGS = ("seed_everything", "model", "data")  # what a resumed or skipped fit must share with the run
HARMLESS = {"data.num_workers", "data.cache_gb", "data.predict_split",  # they never change what is trained
            "model.aggregator.init_args.in_dim", "model.aggregator.init_args.num_classes"}  # linked from the data


class _AlreadyFinished(Exception):
    """Raised before any work when the run directory already holds a finished fit."""


class RunConfig(SaveConfigCallback):
    """Saves the resolved config without ``ckpt_path``, which belongs to one invocation: left in ``config.yaml``
    it would make a later ``mil test --config <run>/config.yaml`` load that checkpoint instead of the best one."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.already_saved and "ckpt_path" in self.config:
            self.config = self.config.clone()
            self.config.ckpt_path = None
        super().setup(trainer, pl_module, stage)


class MILCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        # last.ckpt comes from last_epoch_checkpoint(); this callback keeps the best epoch only. No version
        # counter: a rerun overwrites its own files instead of leaving last.ckpt beside last-v1.ckpt.
        parser.set_defaults({"checkpoint.monitor": "val_auc", "checkpoint.mode": "max", "checkpoint.save_last": False,
                             "checkpoint.filename": "best-epoch{epoch:03d}-auc{val_auc:.4f}",
                             "checkpoint.auto_insert_metric_name": False, "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val_auc", "early_stopping.mode": "max",
                             "early_stopping.patience": 10})
        parser.link_arguments("data.feature_dim", "model.aggregator.init_args.in_dim", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.aggregator.init_args.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Config errors as one line naming the key (the full usage stays behind ``--help``)."""
        for each in (parser, *self._subcommand_parsers.values()):
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            raise InputError(config_error_line(error, self._subcommand_name(args))) from None
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path not in (None, "last", "best"):
            load_checkpoint(ckpt_path)  # before LightningCLI reads its hyper-parameters: bad files end in one line

    @staticmethod
    def _subcommand_name(args: Any) -> str:
        if isinstance(args, dict):
            return str(args.get("subcommand", "fit"))
        return str(args[0]) if isinstance(args, list) and args else "fit"

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        root = Path(config.trainer.default_root_dir or DEFAULT_ROOT)
        config.trainer.default_root_dir = str(root)
        config.checkpoint.save_last = False  # last.ckpt is always written, by last_epoch_checkpoint()
        self._continuing = False
        if self.subcommand == "fit":
            self._prepare_fit(config, root)
        else:
            config.ckpt_path = evaluation_checkpoint(config, root)

    def _prepare_fit(self, config: Any, root: Path) -> None:
        max_epochs = config.trainer.max_epochs
        if max_epochs == 0:
            fail("--trainer.max_epochs 0 trains nothing and would mark an untrained model finished; give at least 1")
        check_same_settings(root / "config.yaml", self._parser("fit").dump(config, skip_none=False))
        checkpoints = Path(config.checkpoint.dirpath) if config.checkpoint.dirpath else root / CHECKPOINTS
        finished = (root / SUMMARY).is_file()
        if config.ckpt_path is None:
            if finished:
                check_run_features(checkpoints / LAST, config.data.features)
                raise _AlreadyFinished(f"{root}: fit already finished ({root / SUMMARY}); skipping. To train more "
                                       "epochs: --ckpt_path last --trainer.max_epochs N; to retrain: delete the folder")
            if (checkpoints / LAST).is_file():  # a killed fit: resume it rather than start a second history
                done = finished_epochs(load_checkpoint(checkpoints / LAST))
                print(f"{root}: resuming the unfinished fit from {checkpoints / LAST} ({done} epoch(s) done); "
                      "delete the folder to start over")
                config.ckpt_path = str(checkpoints / LAST)
            return
        path = checkpoints / LAST if config.ckpt_path == "last" else Path(config.ckpt_path)
        if config.ckpt_path == "last" and not path.is_file():
            fail(f"{path}: no last checkpoint to resume from; drop --ckpt_path to train from the start")
        done = finished_epochs(load_checkpoint(path))
        if finished and max_epochs not in (None, -1) and max_epochs <= done:
            fail(f"{path}: {done} epoch(s) already trained and --trainer.max_epochs is {max_epochs}; "
                 "raise --trainer.max_epochs to continue this fit")
        config.ckpt_path = str(path)
        self._continuing = finished

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer")
        root = Path(trainer_config["default_root_dir"])
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = False if self.subcommand == "predict" else default_loggers(root)
        best = self._get(self.config_init, "checkpoint")
        if best.dirpath is None:  # derived here, never stored in config.yaml
            best.dirpath = str((root / CHECKPOINTS).resolve())
        trainer = super().instantiate_trainer(**kwargs)
        # every subcommand: the callbacks that wrote a checkpoint are the ones that restore it (test saves nothing)
        trainer.callbacks.append(last_epoch_checkpoint(Path(best.dirpath)))
        return trainer

    def before_fit(self) -> None:
        if self._continuing and self.trainer.is_global_zero:  # the run is unfinished again until after_fit
            (Path(self.trainer.default_root_dir) / SUMMARY).unlink(missing_ok=True)

    def _weights_only(self) -> dict:
        """Checkpoints hold tensors and plain values only, so load them without unpickling code."""
        return {"weights_only": True} if "weights_only" in inspect.signature(Trainer.test).parameters else {}

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path"):
            kwargs.update(self._weights_only())
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # predictions go to files, so memory stays flat
        return kwargs

    def after_fit(self) -> None:
        trainer, root = self.trainer, Path(self.trainer.default_root_dir)
        if trainer.interrupted:  # not finished: no summary, so the same command trains again
            return
        best_callback = self._get(self.config_init, "checkpoint")
        best = best_callback.best_model_path or None
        # Before validate() restores the best checkpoint, whose callback state holds the epochs up to its own only.
        tied = best_callback.tied_epochs() if isinstance(best_callback, BestCheckpoint) else []
        best_epoch = getattr(best_callback, "best_epoch", None)
        extra = self._weights_only() if best else {}
        val = trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False, **extra)
        if self.datamodule.items("test"):
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False, **extra)
        metrics = write_run_metrics(root) if trainer.is_global_zero else None
        if trainer.is_global_zero:
            score = best_callback.best_model_score
            summary = {
                "best_checkpoint": best, "best_val_auc": None if score is None else float(score),
                "best_epoch": best_epoch, "epochs_tied_with_best": tied,
                "tie_breaker": getattr(best_callback, "tie_breaker", None),
                "epochs": trainer.current_epoch, "val": val[0] if val else {}, "metrics": metrics or {},
            }
            write_json(root / SUMMARY, summary)
            if epoch_unchosen(summary) and not _TIED_EPOCH_LINES_HELD:
                print(f"warning: {tied_epoch_warning(root, summary, best_callback.monitor)}", flush=True)

    def after_validate(self) -> None:
        self._metrics()

    def after_test(self) -> None:
        self._metrics()

    def _metrics(self) -> None:
        if self.trainer.is_global_zero:
            write_run_metrics(Path(self.trainer.default_root_dir))


_TIED_EPOCH_LINES_HELD = False


@contextmanager
def tied_epoch_warnings_held() -> Iterator[None]:
    """Fits inside this block record their tied epochs in ``fit_summary.json`` but print no line: a caller that runs
    many fits (``mil hnm``) sums them up in one line instead of one per fit."""
    global _TIED_EPOCH_LINES_HELD
    before, _TIED_EPOCH_LINES_HELD = _TIED_EPOCH_LINES_HELD, True
    try:
        yield
    finally:
        _TIED_EPOCH_LINES_HELD = before


def epoch_unchosen(summary: dict[str, Any]) -> bool:
    """Whether validation did not choose a finished fit's epoch: several epochs tied with the kept one on the
    validation score and no tie-breaker chose among them (Lightning then keeps the first)."""
    return len(summary.get("epochs_tied_with_best") or []) > 1 and not summary.get("tie_breaker")


def tied_fits_warning(run_dirs: list[Path], remedy: str) -> str | None:
    """One line for many fits (``mil hnm``, ``mil cv``): how many of them validation did not choose the epoch of,
    from their ``fit_summary.json`` (:func:`epoch_unchosen`). None when there are none."""
    summaries = [json.loads((run / SUMMARY).read_text()) for run in run_dirs if (run / SUMMARY).is_file()]
    unchosen = [s for s in summaries if epoch_unchosen(s)]
    if not unchosen:
        return None
    spans = ", ".join(f"{len(s['epochs_tied_with_best'])} of {s.get('epochs')}" for s in unchosen)
    return (f"{len(unchosen)} of {len(summaries)} slide-model fits kept the first of several epochs tied on "
            f"validation AUC ({spans} epochs tied), so validation did not choose their epoch; {remedy}")


def tied_epoch_warning(root: Path, summary: dict[str, Any], monitor: str | None) -> str:
    """The line for one fit whose epoch validation did not choose (:func:`epoch_unchosen`). On small validation
    sets AUC often reads 1.0 from epoch 0, and epoch 0 is barely trained."""
    tied = summary["epochs_tied_with_best"]
    return (f"{root}: {monitor} {summary['best_val_auc']:.3f} at {len(tied)} of {summary['epochs']} epochs, so "
            f"validation did not choose the epoch kept (epoch {tied[0]}, the first of them); more validation "
            "slides let it choose, or --checkpoint.tie_breaker val_loss keeps the tied epoch with the lowest loss")


def last_epoch_checkpoint(folder: Path) -> ModelCheckpoint:
    """``last.ckpt``, rewritten at the end of every training epoch (after its validation): the last finished
    epoch, whatever ``val_auc`` did. Saved at the epoch's end, so a resumed fit starts cleanly with the next one."""
    return ModelCheckpoint(dirpath=str(folder), filename=LAST.removesuffix(".ckpt"), monitor=None, save_top_k=1,
                           save_last=False, enable_version_counter=False, save_on_train_epoch_end=True)


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, loaded without unpickling code; anything else is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        fail(f"--ckpt_path {path}: no such file; pass a .ckpt from a run's checkpoints/ folder, or leave "
             "--ckpt_path out to use the run's best checkpoint")
    if not zipfile.is_zipfile(path):
        fail(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive); pass a .ckpt written by `mil fit`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        fail(f"{path}: holds pickled objects that torch will not load with weights_only=True; use a checkpoint "
             "written by `mil fit` (never load checkpoints from untrusted sources without it)")
    except Exception as error:  # noqa: BLE001 - any unreadable file (zip, EOF, magic number) is bad input
        fail(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {_first_line(error)}); "
             "pass a .ckpt written by `mil fit`")
    if not isinstance(state, dict) or not {"state_dict", "pytorch-lightning_version"} <= set(state):
        fail(f"{path}: not a Lightning checkpoint (no state_dict); pass a .ckpt written by `mil fit`")
    return state


def check_run_features(checkpoint: Path, features: str | None) -> None:
    """Refuse to skip a finished fit as done when ``features`` now holds features of another make than it read.

    A resumed fit and ``validate``/``test``/``predict`` meet the same check when Lightning restores the data
    module's state from the checkpoint (``MILDataModule.load_state_dict``).
    """
    if features is None or not checkpoint.is_file() or not Path(features).is_dir():
        return
    refuse_other_features(trained_feature_settings(checkpoint), folder_settings(features), features,
                          f"the finished fit's {checkpoint} was trained on", FEATURES_FIX)


def trained_feature_settings(checkpoint: Path) -> dict | None:
    """The settings of the features a checkpoint's model was trained on (None: written before they were kept)."""
    return load_checkpoint(checkpoint).get(MILDataModule.__qualname__, {}).get("feature_settings")


def finished_epochs(state: dict) -> int:
    """Epochs a checkpoint has finished (ours are written after validation, at the end of an epoch)."""
    return int(state.get("epoch", -1)) + 1


def evaluation_checkpoint(config: Any, root: Path) -> str:
    """The checkpoint ``validate``/``test``/``predict`` load: the run's best unless ``--ckpt_path`` names one."""
    runs = [*(Path(str(c)).parent for c in (config.get("config") or [])), root]
    if config.ckpt_path in (None, "best"):
        path = best_checkpoint(runs)
    elif config.ckpt_path == "last":
        path = next((str(run / CHECKPOINTS / LAST) for run in runs if (run / CHECKPOINTS / LAST).is_file()),
                    str(root / CHECKPOINTS / LAST))
    else:
        path = str(config.ckpt_path)
    load_checkpoint(path)
    return path


def best_checkpoint(runs: Path | list[Path]) -> str:
    """The best checkpoint recorded by the first finished fit among ``runs`` (folders holding ``fit_summary.json``)."""
    runs = [runs] if isinstance(runs, Path) else runs
    summary = next((run / SUMMARY for run in runs if (run / SUMMARY).is_file()), None)
    if summary is None:
        fail(f"{runs[-1]}: no finished fit here ({SUMMARY} missing); pass --ckpt_path, or --config "
             "<run>/config.yaml of a finished run")
    best = json.loads(summary.read_text()).get("best_checkpoint")
    if not best:
        fail(f"{summary}: no best checkpoint recorded (val_auc never computed?); pass --ckpt_path")
    moved = summary.parent / CHECKPOINTS / Path(best).name  # the run folder may have been moved or copied
    if not Path(best).is_file() and not moved.is_file():
        fail(f"{summary}: best checkpoint {best!r} not found; pass --ckpt_path")
    return best if Path(best).is_file() else str(moved)


def check_same_settings(saved: Path, current: str) -> None:
    """Refuse to resume or skip a run whose ``config.yaml`` holds other model/data settings than this command."""
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        return  # an unreadable saved config is rewritten by this run
    new = yaml.safe_load(current) or {}
    for key in SETTINGS:
        for name, was, now in _differences(old.get(key), new.get(key), key):
            fail(f"{saved}: this run was made with {name}={was!r}, not {now!r}; pass another "
                 "--trainer.default_root_dir, or the run's own settings to resume or skip it")


def _differences(old: Any, new: Any, name: str):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{name}.{key}")
    elif old != new and name not in HARMLESS:
        yield name, old, new


def check_yaml_files(argv: list[str]) -> None:
    """``--config`` files must exist and parse; a syntax error names the file and line."""
    for index, arg in enumerate(argv):
        if arg in ("--config", "-c") and index + 1 < len(argv):
            read_config(Path(argv[index + 1]))
        elif arg.startswith("--config="):
            read_config(Path(arg.split("=", 1)[1]))


def config_error_line(error: ArgumentError, subcommand: str) -> str:
    """One line from a jsonargparse error: the offending key and value, and where to look for the options."""
    text = re.sub(r"\s+", " ", str(error)).strip()
    text = text.replace("<unicode string>", "the config")
    if len(text) > 400:
        text = text[:400] + " ..."
    return f"mil {subcommand}: {text}; see `mil {subcommand} --help` for the options"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def default_loggers(root: Path) -> list[Logger]:
    """W&B in offline mode (no account needed; ``wandb sync`` later) first, so the config lands in ``root``."""
    os.environ.setdefault("WANDB_MODE", "offline")
    root.mkdir(parents=True, exist_ok=True)
    wandb = WandbLogger(save_dir=str(root), offline=True, project="hnm-mil", name=root.name)
    wandb._wandb_init.pop("anonymous", None)  # Lightning passes a setting W&B deprecated; W&B warns on every run
    return [wandb, CSVLogger(save_dir=str(root), name="csv")]


def _run(subcommand: str, command: list[str] | MILCommand) -> None:
    """One LightningCLI run, from a command line (the ``mil`` dispatcher) or a :class:`MILCommand` (other
    commands: ``mil hnm``, ``mil cv``), never a command line built by another command."""
    config_name = "config.yaml" if subcommand == "fit" else f"config_{subcommand}.yaml"
    # argv arrives explicitly from the `mil` dispatcher, which LightningCLI would otherwise warn about
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # expected here, not news: test/predict write into another folder than the checkpoint's, and a resumed fit
    # finds its own checkpoints
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    try:
        _cli(MILCLI, subcommand, command, save_config_callback=RunConfig,
             save_config_kwargs={"config_filename": config_name, "overwrite": True}, parser_kwargs={"prog": "mil"})
    except _AlreadyFinished as done:
        print(done)
    finally:
        finish_wandb()


def parsed_settings(subcommand: str, command: list[str] | MILCommand) -> dict[str, Any]:
    """A ``mil fit|predict`` run's settings as its own parser resolves them, config file included; nothing runs."""

    class Parsed(Exception):
        pass

    class ParseOnly(MILCLI):
        def _set_seed(self) -> None:  # the real run seeds; checking must not touch global random state
            pass

        def before_instantiate_classes(self) -> None:
            raise Parsed(self.config[self.subcommand].as_dict())

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        _cli(ParseOnly, subcommand, command, save_config_callback=None,
             parser_kwargs={"exit_on_error": False, "prog": f"mil {subcommand}"})
    except Parsed as parsed:
        return parsed.args[0]
    raise InputError(f"mil {subcommand}: could not read its settings")  # unreachable: the CLI always parses first


def _cli(cli: type[MILCLI], subcommand: str, command: list[str] | MILCommand, **options: Any) -> None:
    """``cli`` with the defaults every ``mil`` run shares, given the resolved mapping of a :class:`MILCommand` or
    a user's command line."""
    if isinstance(command, MILCommand):
        args: list[str] | dict[str, Any] = {"subcommand": subcommand, subcommand: command.resolved()}
    else:
        check_yaml_files(command)
        args = [subcommand, *command]
    trainer_defaults = {"callbacks": [RunOutputs()], "max_epochs": 50, "log_every_n_steps": 10,
                        "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"}
    cli(MILModule, MILDataModule, args=args, seed_everything_default=0, trainer_defaults=trainer_defaults, **options)


def finish_wandb() -> None:
    """Close this command's W&B run: Lightning leaves it open, and a later command in the same process (the
    ``mil hnm`` loop, ``mil cv``) would otherwise log into it and leave its own run folder without W&B files."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def fit(command: list[str] | MILCommand) -> None:
    """Train a slide model; evaluate the best checkpoint on val (and test); write the run directory."""
    _run("fit", command)


def validate(command: list[str] | MILCommand) -> None:
    _run("validate", command)


def test(command: list[str] | MILCommand) -> None:
    _run("test", command)


def predict(command: list[str] | MILCommand) -> None:
    _run("predict", command)
