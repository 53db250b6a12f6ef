"""``mil hnm``: the hard-negative mining loop (HNM-WSI), resumable stage by stage.

    mil hnm --config configs/hnm/camelyon16.yaml --rounds 2 --out runs/hnm

Round 0 embeds the cohort with the starting encoder (optionally SimCLR-pretrained on the cohort first), trains
the slide model, scores every training patch and mines a selection. Round r >= 1 fine-tunes the encoder on
round r-1's selection (continuing from round r-1's weights), re-extracts, retrains and re-mines::

    DIR/round_<r>/features/        coords/ (tiled once, in round 0, then reused) and features/<tag>/
    DIR/round_<r>/encoder.safetensors   the encoder behind this round's features (absent: the starting one)
    DIR/round_<r>/mil/             `mil fit` run: checkpoints, predictions, metrics.json (val and test)
    DIR/round_<r>/mil_train/       `mil predict --data.predict_split train`: training patch scores
    DIR/round_<r>/selection.csv    mined from this round's model; fine-tunes round r+1's encoder
    DIR/round_<r>/.<stage>.done    JSON written when a stage completed; a rerun skips that stage

Every stage calls the same command function a user runs. A stage without its marker is redone from a clean
state (a half-written run directory is removed first), so killing the loop anywhere and rerunning resumes.
Models are chosen on validation only: the slide model by validation AUC within a round, the round by
validation AUC across rounds; test numbers are reported, never used to choose.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from jsonargparse import ActionConfigFile, ArgumentParser

from features.encoders import EncoderConfig
from features.errors import InputError
from features.store import atomic_path
from mil.mining.mine import MiningConfig

SUMMARY_NAME = "hnm_summary.csv"


@dataclass
class Cohort:
    slides: str
    """Slide folder or slides CSV."""
    labels: str
    """Labels CSV with split (or fold_<k>) columns."""
    annotations: str | None = None
    """Polygons: enables patch AUC and selection quality."""
    fold: int | None = None
    """Fold column fold_<k> to use; None = the split column."""


@dataclass
class HNMArgs:
    """The loop's settings; ``*_options`` are passed through as ``--key value`` to the stage's command."""

    cohort: Cohort
    """The slides, labels and annotations."""
    out: str = "runs/hnm"
    """Folder of the loop's rounds (resumable)."""
    rounds: int = 1
    """Refreshes after round 0: round 0 .. round N."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The round-0 encoder (timm name, weights, seed)."""
    pretrain: bool = False
    """SimCLR on the cohort before round 0 (`features pretrain`)."""
    tiling_options: dict[str, Any] = field(default_factory=dict)
    """Options of `features tile` and `features extract`: mpp, patch_size, tissue ..."""
    extract_options: dict[str, Any] = field(default_factory=dict)
    """Options of `features extract`: batch_size, num_workers ..."""
    pretrain_options: dict[str, Any] = field(default_factory=dict)
    """Options of `features pretrain`: data.*, trainer.* ..."""
    mil_config: str = "configs/mil/abmil.yaml"
    """LightningCLI YAML of the slide model."""
    mil_options: dict[str, Any] = field(default_factory=dict)
    """Options of `mil fit` and `mil predict`: trainer.*, model.*, data.* ..."""
    mining: MiningConfig = field(default_factory=MiningConfig)
    """Thresholds and ratios of mining."""
    finetune_options: dict[str, Any] = field(default_factory=dict)
    """Options of `features finetune`: data.*, optim.*, trainer.*."""
    evaluate_options: dict[str, Any] = field(default_factory=dict)
    """Options of `mil evaluate`: n_bootstrap, min_overlap ..."""


def options(values: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"trainer": {"max_epochs": 2}}`` -> ``["--trainer.max_epochs", "2"]`` (YAML/JSON spelling of values)."""
    argv: list[str] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not name.endswith("model_kwargs") and not name.endswith("label_map"):
            argv += options(value, f"{name}.")
        else:
            argv += [f"--{name}", _text(value)]
    return argv


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


class Stages:
    """Runs named stages of one round, each at most once to completion, recording wall time in its marker."""

    def __init__(self, round_dir: Path):
        self.round_dir = round_dir
        self.seconds: dict[str, float] = {}

    def marker(self, name: str) -> Path:
        return self.round_dir / f".{name}.done"

    def run(self, name: str, body: Callable[[], None], partial: Path | None = None) -> None:
        marker = self.marker(name)
        if marker.is_file():
            self.seconds[name] = float(json.loads(marker.read_text()).get("seconds", math.nan))
            print(f"[{self.round_dir.name}] {name}: done before, skipping")
            return
        if partial is not None and partial.exists():
            shutil.rmtree(partial)  # a killed stage's half-written run directory: start it clean
        print(f"[{self.round_dir.name}] {name} ...", flush=True)
        started = time.perf_counter()
        body()
        seconds = time.perf_counter() - started
        self.seconds[name] = seconds
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps({"stage": name, "seconds": round(seconds, 3),
                                       "finished": datetime.now(timezone.utc).isoformat()}) + "\n")


@dataclass
class RoundPaths:
    root: Path

    @property
    def store(self) -> Path:
        return self.root / "features"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder.safetensors"

    @property
    def mil(self) -> Path:
        return self.root / "mil"

    @property
    def mil_train(self) -> Path:
        return self.root / "mil_train"

    @property
    def selection(self) -> Path:
        return self.root / "selection.csv"

    def features(self, tag: str) -> Path:
        return self.store / "features" / tag


def round_paths(out: Path, index: int) -> RoundPaths:
    return RoundPaths(out / f"round_{index}")


def encoder_argv(encoder: EncoderConfig, weights: Path | str | None) -> list[str]:
    argv = ["--encoder.name", encoder.name, "--encoder.seed", str(encoder.seed),
            "--encoder.model_kwargs", json.dumps(encoder.model_kwargs)]
    if encoder.input_size:
        argv += ["--encoder.input_size", str(encoder.input_size)]
    if weights:
        argv += ["--encoder.weights", str(weights)]
    elif encoder.pretrained:
        argv += ["--encoder.pretrained", "true"]
    return argv


def run_round(args: HNMArgs, index: int) -> dict[str, Any]:
    """All stages of one round; returns its summary row."""
    from features.extraction.cli import extract, tile
    from features.training import finetune, pretrain
    from mil.evaluation.cli import main as evaluate
    from mil.mining.cli import main as mine
    from mil.training.cli import fit, predict

    out = Path(args.out)
    here, first = round_paths(out, index), round_paths(out, 0)
    here.root.mkdir(parents=True, exist_ok=True)
    stages = Stages(here.root)
    cohort = args.cohort
    fold = [] if cohort.fold is None else ["--data.fold", str(cohort.fold)]
    tag = f"{args.encoder.name.replace('/', '_').replace(':', '_')}-round{index}"

    if index == 0:
        stages.run("tile", lambda: tile(["--slides", cohort.slides, "--out", str(first.store),
                                         *options(args.tiling_options)]))
        if args.pretrain:
            stages.run("pretrain", lambda: pretrain.main([
                "--slides", cohort.slides, "--coords", str(first.store), "--out", str(here.encoder),
                *encoder_argv(args.encoder, args.encoder.weights), *options(args.pretrain_options)]))
    else:
        previous = round_paths(out, index - 1)
        stages.run("finetune", lambda: finetune.main([
            "--slides", cohort.slides, "--coords", str(previous.store), "--selection", str(previous.selection),
            "--out", str(here.encoder), *encoder_argv(args.encoder, current_weights(args, out, index - 1)),
            *options(args.finetune_options)]))
    weights = current_weights(args, out, index)
    stages.run("extract", lambda: extract([
        "--slides", cohort.slides, "--out", str(here.store), "--coords", str(first.store / "coords"),
        *encoder_argv(args.encoder, weights), "--encoder.tag", tag,
        *options(args.tiling_options), *options(args.extract_options)]))
    mil_data = ["--config", args.mil_config, *options(args.mil_options), "--data.features", str(here.features(tag)),
                "--data.labels", cohort.labels, *fold]
    stages.run("fit", lambda: fit([*mil_data, "--trainer.default_root_dir", str(here.mil)]), partial=here.mil)
    stages.run("predict_train", lambda: predict([
        *mil_data, "--data.predict_split", "train", "--trainer.default_root_dir", str(here.mil_train),
        "--ckpt_path", best_checkpoint(here.mil)]), partial=here.mil_train)
    annotations = ["--annotations", cohort.annotations, "--features", str(here.features(tag))] if cohort.annotations else []
    stages.run("evaluate", lambda: evaluate(["--run", str(here.mil), *annotations, *options(args.evaluate_options)]))
    mining = options(json.loads(json.dumps(asdict(args.mining))), "mining.")
    quality = ["--annotations", cohort.annotations] if cohort.annotations else []
    stages.run("mine", lambda: mine([
        "--scores", str(here.mil_train), "--labels", cohort.labels, "--out", str(here.selection), "--round", str(index),
        "--coords", str(first.store), "--features", str(here.features(tag)), *quality, *mining, *([] if cohort.fold is None else ["--fold", str(cohort.fold)])]))
    return summary_row(index, here, stages.seconds)


def current_weights(args: HNMArgs, out: Path, index: int) -> str | None:
    """The encoder behind round ``index``: its own weights file, else the previous round's, else the start."""
    for r in range(index, -1, -1):
        path = round_paths(out, r).encoder
        if path.is_file():
            return str(path)
    return args.encoder.weights


def best_checkpoint(run: Path) -> str:
    summary = run / "fit_summary.json"
    if not summary.is_file():
        raise InputError(f"{run}: the slide model has not finished training; rerun `mil hnm`")
    return str(json.loads(summary.read_text())["best_checkpoint"])


def summary_row(index: int, here: RoundPaths, seconds: dict[str, float]) -> dict[str, Any]:
    metrics = _json(here.mil / "metrics.json")
    slide = metrics.get("slide", {})
    patch = metrics.get("patch", {})
    test_auc = slide.get("metrics", {}).get("auc", {}) if slide.get("evaluated_split") == "test" else {}
    quality = _json(here.root / "selection_quality.json")
    selection = pd.read_csv(here.selection) if here.selection.is_file() else pd.DataFrame({"kind": []})
    counts = selection["kind"].value_counts()
    row: dict[str, Any] = {
        "round": index,
        "val_slide_auc": _json(here.mil / "fit_summary.json").get("best_val_auc"),
        "test_slide_auc": _get(test_auc, "value", "estimate", "point"),
        "test_slide_auc_low": _get(test_auc, "low", "lower", "ci_low"),
        "test_slide_auc_high": _get(test_auc, "high", "upper", "ci_high"),
        "test_patch_auc": patch.get("pooled_auc"),
        "test_tumor_vs_lookalike_auc": patch.get("tumor_vs_lookalike_auc"),
        "n_positive": int(counts.get("positive", 0)),
        "n_hard_negative": int(counts.get("hard_negative", 0)),
        "n_negative": int(counts.get("negative", 0)),
        "positive_precision": quality.get("positive_precision"),
        "hard_negative_lookalike": quality.get("hard_negative_composition", {}).get("lookalike"),
        "random_negative_lookalike": quality.get("random_negative_composition", {}).get("lookalike"),
        "lookalike_enrichment": quality.get("lookalike_enrichment"),
    }
    row.update({f"seconds_{name}": round(value, 1) for name, value in seconds.items()})
    return row


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _get(values: dict[str, Any], *keys: str) -> Any:
    return next((values[k] for k in keys if k in values), None)


def write_summary(out: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """``hnm_summary.csv``, with the round chosen on validation AUC marked (test AUC is never used to choose)."""
    table = pd.DataFrame(rows)
    val = pd.to_numeric(table["val_slide_auc"], errors="coerce")
    table["chosen_on_val"] = False
    if val.notna().any():
        table.loc[val.idxmax(), "chosen_on_val"] = True
    with atomic_path(out / SUMMARY_NAME) as tmp:
        table.to_csv(tmp, index=False)
    return table


def parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mil hnm", description=__doc__.strip().splitlines()[0], default_env=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(HNMArgs, as_positional=False, fail_untyped=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    p = parser()
    namespace = p.parse_args(argv)
    namespace.pop("config", None)
    values = p.instantiate_classes(namespace)
    run(HNMArgs(**{name: values[name] for name in HNMArgs.__dataclass_fields__}))


def run(args: HNMArgs) -> pd.DataFrame:
    if args.rounds < 0:
        raise InputError(f"--rounds {args.rounds}: use 0 (round 0 only) or more")
    for path, what in ((args.cohort.labels, "labels CSV"), (args.mil_config, "MIL config")):
        if not Path(path).is_file():
            raise InputError(f"{path}: {what} not found")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_round(args, index) for index in range(args.rounds + 1)]
    table = write_summary(out, rows)
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nwrote {out / SUMMARY_NAME}")
    return table
