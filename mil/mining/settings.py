"""The mining loop's settings: typed per stage and checked before the first stage runs.

``mil hnm`` reads one YAML file. Its ``*_options`` sections are read into the dataclass (or LightningCLI parser)
of the command each stage runs, with that command's own checks, so a misspelt key or a wrong type in any
section stops the loop at start-up in one line, not after a round of work. Every round's stage settings are
planned up front as typed objects (:class:`RoundPlan`) and checked by the parser that will read them; the stages
receive those objects, never a command line (``mil fit|predict`` get a :class:`MILCommand`).

What a loop folder was made with is stored in it (:mod:`mil.mining.provenance`).
"""

from __future__ import annotations

from argparse import ArgumentError
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from features.encoders import EncoderConfig
from features.errors import InputError
from features.extraction.extract import ExtractOptions, TileOptions
from features.options import from_values
from mil.evaluation.cli import EvaluateArgs
from mil.evaluation.ensemble import EnsembleArgs
from mil.mining.cli import MineArgs
from mil.mining.layout import RoundPaths, round_paths
from mil.mining.mine import MiningConfig
from mil.training.command import MILCommand, dotted


@dataclass
class Cohort:
    """The slides the loop runs on.

    Attributes:
        slides: slide folder or slides CSV (``slide_id,path[,mpp]``).
        labels: labels CSV with a ``split`` (or ``fold_<k>``) column.
        annotations: folder of ASAP XML / GeoJSON polygons: enables patch AUC and selection quality.
        fold: which ``fold_<k>`` column to use; None uses ``split``.
    """

    slides: str
    labels: str
    annotations: str | None = None
    fold: int | None = None


@dataclass
class HNMArgs:
    """The loop's settings; each ``*_options`` section holds options of the command that stage runs.

    Attributes:
        cohort: slides, labels, annotations, fold.
        out: loop folder (``round_<r>/``, ``hnm_summary.csv``, ``hnm_config.yaml``).
        rounds: refreshes after round 0 (round 0 .. round N); may grow between reruns of one folder.
        overwrite: discard what an earlier loop left in ``out`` (rounds, summary, config) and start over.
        encoder: the starting encoder (timm name, weights, seed); later rounds fine-tune it.
        pretrain: SimCLR on the cohort before round 0 (``features pretrain``).
        tiling_options: options of ``features tile`` (mpp, patch_size, tissue, ...); extraction uses them too.
        extract_options: options of ``features extract`` (batch_size, num_workers, accelerator, precision, ...).
        pretrain_options: options of ``features pretrain`` (data, optim, trainer, augment).
        mil_config: ``mil fit`` YAML of the slide model.
        mil_options: ``mil fit|predict`` options on top of ``mil_config`` (trainer, model, data, ...).
        ensemble_seeds: more slide models per round, one per seed (``--seed_everything s --data.seed s``); with
            any, the round's slide predictions (slide AUCs in the summary, the round chosen on validation) are
            the mean of them and the first (``mil_options``) fit (``mil ensemble``); patch scores, and so mining
            and the patch AUCs, stay the first fit's.
        mining: ``mil mine`` settings (threshold, positive schedule, neg_ratio, twin test, seed).
        finetune_options: options of ``features finetune`` (data, optim, trainer, phases, augment).
        evaluate_options: options of ``mil evaluate`` (n_bootstrap, min_overlap, top_k, ...).
    """

    cohort: Cohort
    out: str = "runs/hnm"
    rounds: int = 1
    overwrite: bool = False
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    pretrain: bool = False
    tiling_options: dict[str, Any] = field(default_factory=dict)
    extract_options: dict[str, Any] = field(default_factory=dict)
    pretrain_options: dict[str, Any] = field(default_factory=dict)
    mil_config: str = "configs/mil/abmil.yaml"
    mil_options: dict[str, Any] = field(default_factory=dict)
    ensemble_seeds: list[int] = field(default_factory=list)
    mining: MiningConfig = field(default_factory=MiningConfig)
    finetune_options: dict[str, Any] = field(default_factory=dict)
    evaluate_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundPlan:
    """Every stage of one round, settings resolved; ``predict`` lacks ``ckpt_path`` (the fit decides it)."""

    index: int
    paths: RoundPaths
    tag: str
    tile: TileOptions | None
    pretrain: Any  # PretrainArgs | None (imported lazily: it pulls in Lightning)
    finetune: Any  # FinetuneArgs | None
    extract: ExtractOptions
    fit: MILCommand
    fit_seeds: dict[int, MILCommand]
    """Extra fits of the seed ensemble (empty: none), by seed."""
    ensemble: Any  # EnsembleArgs | None
    evaluated: Path
    """The run the round reports: the ensemble's folder, or the first fit's."""
    predict: MILCommand
    evaluate: EvaluateArgs
    evaluate_given: dict[str, Any]
    """The ``mil evaluate`` settings the loop gave (its stage marker compares these, not the defaults)."""
    mine: MineArgs


# Keys each stage's command gets from the loop itself; setting them in an ``*_options`` section is an error.
OWNED = {
    "tiling_options": {"slides", "out", "coords", "encoder"},
    "extract_options": {"slides", "out", "coords", "encoder"},
    "pretrain_options": {"slides", "out", "coords", "encoder"},
    "finetune_options": {"slides", "out", "coords", "selection", "encoder"},
    "mil_options": {"data.features", "data.labels", "data.fold", "data.predict_split", "trainer.default_root_dir",
                    "ckpt_path", "config"},
    "evaluate_options": {"run", "predictions", "val_predictions", "out", "annotations", "features", "patch_scores"},
}
GPU_NAMES = {"gpu", "cuda"}


def check_owned(args: HNMArgs) -> None:
    for section, owned in OWNED.items():
        for key in dotted(getattr(args, section), leaves=()):
            if key in owned or any(key.startswith(f"{name}.") for name in owned):
                raise InputError(f"{section}.{key}: the loop sets this itself (from cohort.*, encoder.* and --out); "
                                 "remove it from the loop config")


def stage_encoder(encoder: EncoderConfig, weights: str | None, tag: str | None = None) -> dict[str, Any]:
    """The loop's encoder with this round's weights (a weights file wins over timm's pretrained ones)."""
    return asdict(replace(encoder, weights=weights, pretrained=encoder.pretrained and not weights, tag=tag))


def encoder_tag(encoder: EncoderConfig, index: int) -> str:
    return f"{encoder.name.replace('/', '_').replace(':', '_')}-round{index}"


def plan_round(args: HNMArgs, index: int) -> RoundPlan:
    """Resolve and check every stage's settings of round ``index`` (no stage runs, no file is read)."""
    from features.training.finetune import FinetuneArgs
    from features.training.pretrain import PretrainArgs

    out, cohort = Path(args.out), args.cohort
    here, first = round_paths(out, index), round_paths(out, 0)
    tag = encoder_tag(args.encoder, index)
    start = str(first.encoder) if args.pretrain else args.encoder.weights
    weights = start if index == 0 else str(here.encoder)
    tile = pretrain = finetune = None
    if index == 0:
        tile = from_values(TileOptions, {**args.tiling_options, "slides": cohort.slides, "out": str(first.store)},
                           "tiling_options", "features tile")
        if args.pretrain:
            pretrain = from_values(PretrainArgs, {
                **args.pretrain_options, "slides": cohort.slides, "coords": str(first.store), "out": str(here.encoder),
                "encoder": stage_encoder(args.encoder, args.encoder.weights)}, "pretrain_options", "features pretrain")
    else:
        previous = round_paths(out, index - 1)
        before = start if index == 1 else str(previous.encoder)
        finetune = from_values(FinetuneArgs, {
            **args.finetune_options, "slides": cohort.slides, "coords": str(previous.store),
            "selection": str(previous.selection), "out": str(here.encoder),
            "encoder": stage_encoder(args.encoder, before)}, "finetune_options", "features finetune")
    extract = from_values(ExtractOptions, {
        **args.tiling_options, **args.extract_options, "slides": cohort.slides, "out": str(here.store),
        "coords": str(first.store / "coords"), "encoder": stage_encoder(args.encoder, weights, tag)},
        "tiling_options + extract_options", "features extract")
    fold = {} if cohort.fold is None else {"data.fold": cohort.fold}
    features = str(here.features(tag))
    mil_data = MILCommand(args.mil_config).updated(args.mil_options).updated(
        {"data.features": features, "data.labels": cohort.labels, **fold})
    # The loop prints one line per stage; Lightning's model summary table (the same each round) is left to `mil fit`.
    quiet = {"trainer.enable_model_summary": False}
    fit_seeds = {seed: mil_data.updated({"seed_everything": seed, "data.seed": seed, **quiet,
                                         "trainer.default_root_dir": str(here.mil_seed(seed))})
                 for seed in args.ensemble_seeds}
    ensemble = (EnsembleArgs(runs=[str(here.mil), *map(str, map(here.mil_seed, args.ensemble_seeds))],
                             out=str(here.mil_ensemble)) if args.ensemble_seeds else None)
    evaluated = here.mil_ensemble if ensemble else here.mil
    annotations = {"annotations": cohort.annotations, "features": features} if cohort.annotations else {}
    evaluate_given = {"run": str(evaluated), **annotations, **args.evaluate_options}
    mine = MineArgs(scores=str(here.mil_train), labels=cohort.labels, out=str(here.selection), fold=cohort.fold,
                    round=index, annotations=cohort.annotations, coords=str(first.store),
                    features=features, mining=args.mining)
    return RoundPlan(
        index=index, paths=here, tag=tag, tile=tile, pretrain=pretrain, finetune=finetune, extract=extract,
        fit=mil_data.updated({**quiet, "trainer.default_root_dir": str(here.mil)}), fit_seeds=fit_seeds,
        ensemble=ensemble, evaluated=evaluated,
        predict=mil_data.updated({"data.predict_split": "train", "trainer.default_root_dir": str(here.mil_train)}),
        evaluate=from_values(EvaluateArgs, evaluate_given, "evaluate_options", "mil evaluate"),
        evaluate_given=evaluate_given,
        mine=mine,
    )


def plan(args: HNMArgs) -> list[RoundPlan]:
    """Every round's settings, checked: a bad key or value anywhere exits 2 here, before any stage runs."""
    if args.rounds < 0:
        raise InputError(f"--rounds {args.rounds}: use 0 (round 0 only) or more")
    check_owned(args)
    rounds = [plan_round(args, index) for index in range(args.rounds + 1)]
    for path, what in ((args.cohort.labels, "cohort.labels: labels CSV"), (args.mil_config, "mil_config: MIL config")):
        if not Path(path).is_file():
            raise InputError(f"{path}: {what} not found")
    fit = check_mil("fit", rounds[0].fit)
    check_ensemble_seeds(args.ensemble_seeds, fit.get("seed_everything"))
    check_mil("predict", rounds[0].predict)
    check_devices(rounds, fit)
    return rounds


def check_ensemble_seeds(seeds: list[int], first_seed: Any) -> None:
    """Each seed of the ensemble once, and not the first fit's own seed: a repeated seed repeats a model."""
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise InputError(f"ensemble_seeds: seed(s) {repeated} listed twice; list each seed once")
    if isinstance(first_seed, int) and not isinstance(first_seed, bool) and first_seed in seeds:
        raise InputError(f"ensemble_seeds: {first_seed} is the first fit's seed_everything already; pick other seeds")


def check_mil(subcommand: str, command: MILCommand) -> dict[str, Any]:
    """Parse a ``mil fit|predict`` run with its own LightningCLI parser, stopping before any work."""
    from mil.training.cli import parsed_settings

    try:
        return parsed_settings(subcommand, command)
    except (ArgumentError, ValueError, TypeError) as error:
        detail = " ".join(str(error).split())
        raise InputError(f"mil_config / mil_options: {detail}; see `mil {subcommand} --help` for its options") from None


def check_devices(rounds: list[RoundPlan], fit: Mapping[str, Any]) -> None:
    """A GPU asked for on a machine without one: one line naming the setting, not a failure mid-loop."""
    import torch

    if torch.cuda.is_available():
        return
    asked = [("extract_options.accelerator", rounds[0].extract.accelerator),
             ("mil_options / mil_config trainer.accelerator", str((fit.get("trainer") or {}).get("accelerator")))]
    for plan_ in rounds:
        if plan_.pretrain is not None:
            asked.append(("pretrain_options.trainer.accelerator", plan_.pretrain.trainer.accelerator))
        if plan_.finetune is not None:
            asked.append(("finetune_options.trainer.accelerator", plan_.finetune.trainer.accelerator))
    for key, value in asked:
        if str(value).lower() in GPU_NAMES:
            raise InputError(f"{key} is {value!r} but this machine has no CUDA GPU; set it to cpu (or auto) in the "
                             "loop config, or run on a GPU machine")
