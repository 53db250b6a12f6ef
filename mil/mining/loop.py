"""``mil hnm``: the hard-negative mining loop (HNM-WSI), resumable stage by stage.

    mil hnm --config configs/hnm/camelyon16.yaml --rounds 2 --out runs/hnm

Round 0 embeds the cohort with the starting encoder (optionally SimCLR-pretrained on the cohort first), trains
the slide model, scores every training patch and mines a selection. Round r >= 1 fine-tunes the encoder on
round r-1's selection (continuing from round r-1's weights), re-extracts, retrains and re-mines::

    DIR/round_<r>/features/        coords/ (tiled once, in round 0, then reused) and features/<tag>/
    DIR/round_<r>/encoder.safetensors   the encoder behind this round's features (absent: the starting one)
    DIR/round_<r>/mil/             `mil fit` run: checkpoints, predictions, metrics.json (val and test)
    DIR/round_<r>/mil_seed<s>/     with ensemble_seeds: one more `mil fit` run per seed
    DIR/round_<r>/mil_ensemble/    with ensemble_seeds: `mil ensemble` of mil/ and mil_seed*/, evaluated instead
    DIR/round_<r>/mil_train/       `mil predict --data.predict_split train`: training patch scores
    DIR/round_<r>/selection.csv    mined from this round's model; fine-tunes round r+1's encoder
    DIR/round_<r>/.<stage>.done    JSON written when a stage completed: its settings, input hashes and code
    DIR/hnm_config.yaml, hnm_inputs.json   the resolved loop config and its input files' content hashes
    DIR/hnm_summary.csv            one row per round

Every stage's settings are read into the typed options of its command before round 0 starts
(:mod:`mil.mining.settings`), so a bad key anywhere stops the loop at once. A rerun into a folder made with
other settings is refused (:mod:`mil.mining.provenance`); with the same settings it skips finished stages. A
stage without its marker is redone from a clean state (a half-written run directory is removed first), so
killing the loop anywhere and rerunning resumes.
Models are chosen on validation only: the slide model by validation AUC within a round, the round by
validation AUC across rounds; test numbers are reported, never used to choose. With ``ensemble_seeds`` each
round also fits one slide model per extra seed and reports the mean of their slide predictions (validation AUC
included); patch scores, mining included, stay the first fit's (docs/method.md says why).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from features.errors import InputError
from features.options import parse
from features.store import atomic_path
from mil.evaluation.ensemble import ENSEMBLE_NAME
from mil.mining.provenance import (FIX, SUMMARY_NAME, code_fingerprint, default_settings, first_difference,
                                   fingerprint, prepare_folder)
from mil.mining.settings import HNMArgs, RoundPaths, RoundPlan, plan, round_paths
from mil.training.cli import SUMMARY as FIT_SUMMARY
from mil.training.cli import tied_epoch_warnings_held, tied_fits_warning
from mil.training.command import yaml_texts

__all__ = ["HNMArgs", "SUMMARY_NAME", "main", "run", "write_summary"]


class Stages:
    """Runs named stages of one round, each at most once to completion.

    A stage's marker records the settings it ran with and content hashes of the files it read (upstream markers
    included), with paths spelled relative to the loop (``<out>/...``, ``<cohort.labels>``). A marker that does
    not match what the stage would run now is refused: its output was made another way. It also records the
    code (``code_fingerprint``); a stage made by other code is reused, since settings and inputs decide what it
    computes, but the skip line says so, so a loop folder that mixes code versions is never silent.
    """

    def __init__(self, round_dir: Path, spell: Callable[[Any], Any]):
        self.round_dir = round_dir
        self.spell = spell
        self.seconds: dict[str, float] = {}

    def marker(self, name: str) -> Path:
        return self.round_dir / f".{name}.done"

    def run(self, name: str, body: Callable[[], object], settings: Any, inputs: Iterable[Path | str] = (),
            partial: Path | None = None) -> None:
        """``settings``: the stage's arguments, a dataclass (a marker written before one of its fields existed
        matches where that field holds its default) or the dict a command records."""
        defaults = None
        if is_dataclass(settings):
            defaults, settings = {"settings": default_settings(type(settings))}, asdict(settings)
        record = {"settings": self.spell(without_display(json.loads(json.dumps(settings, default=str)))),
                  "inputs": {self.spell(str(path)): fingerprint(str(path)) for path in inputs}}
        marker = self.marker(name)
        if marker.is_file():
            stored = json.loads(marker.read_text())
            stored["settings"] = without_display(stored.get("settings"))  # markers written before DISPLAY_ONLY
            difference = first_difference({key: stored.get(key) or {} for key in record}, record, defaults)
            if difference:
                key, old, new = difference
                raise InputError(f"{marker}: stage {name} ran with other settings or inputs ({key} was {old!r}, now "
                                 f"{new!r}); {FIX}")
            self.seconds[name] = float(stored.get("seconds", math.nan))
            code, now = stored.get("code"), code_fingerprint()
            other = "" if code == now else f" by other hnm-mil code ({code or 'unrecorded'}, now {now})"
            print(f"[{self.round_dir.name}] {name}: done before{other}, skipping"
                  + (" (--overwrite true redoes the loop)" if other else ""))
            return
        if partial is not None and partial.exists():
            shutil.rmtree(partial)  # a killed stage's half-written run directory: start it clean
        print(f"[{self.round_dir.name}] {name} ...", flush=True)
        started = time.perf_counter()
        body()
        seconds = time.perf_counter() - started
        self.seconds[name] = seconds
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps({"stage": name, **record, "code": code_fingerprint(), "seconds": round(seconds, 3),
                                       "finished": datetime.now(timezone.utc).isoformat()}, indent=1) + "\n")


def spelling(args: HNMArgs) -> Callable[[Any], Any]:
    """Paths as the loop names them, so a moved cohort or loop folder still matches its markers."""
    names = {args.cohort.slides: "<cohort.slides>", args.cohort.labels: "<cohort.labels>",
             args.cohort.annotations: "<cohort.annotations>", args.mil_config: "<mil_config>",
             args.encoder.weights: "<encoder.weights>"}
    names.pop(None, None)
    out = str(Path(args.out))

    def spell(value: Any) -> Any:
        if isinstance(value, dict):
            return {spell(k): spell(v) for k, v in value.items()}
        if isinstance(value, list):
            return [spell(v) for v in value]
        if isinstance(value, str):
            if value in names:
                return names[value]
            if value == out or value.startswith(out + os.sep):
                return "<out>" + value[len(out):]
        return value

    return spell


# What a command prints, not what it computes: left out of stage markers, so a quieter or louder rerun resumes.
DISPLAY_ONLY = frozenset({"trainer.enable_model_summary", "trainer.enable_progress_bar"})


def without_display(settings: Any) -> Any:
    """A stage's settings less those that only change what it prints (``DISPLAY_ONLY``); others pass as they are."""
    if not isinstance(settings, dict):
        return settings
    return {key: value for key, value in settings.items() if key not in DISPLAY_ONLY}


def run_round(args: HNMArgs, step: RoundPlan) -> dict[str, Any]:
    """All stages of one round, each given its typed settings; returns the round's summary row."""
    from features.extraction.cli import run_extract, run_tile
    from features.training.finetune import finetune
    from features.training.pretrain import pretrain
    from mil.evaluation.cli import evaluate
    from mil.evaluation.ensemble import ensemble
    from mil.mining.cli import mine
    from mil.training.cli import best_checkpoint, fit, predict

    out = Path(args.out)
    here, first = step.paths, round_paths(out, 0)
    here.root.mkdir(parents=True, exist_ok=True)
    stages = Stages(here.root, spelling(args))
    done = lambda paths, name: paths.root / f".{name}.done"  # noqa: E731

    if step.tile is not None:
        stages.run("tile", lambda: run_tile(step.tile), step.tile)
    if step.pretrain is not None:
        stages.run("pretrain", lambda: pretrain(step.pretrain), step.pretrain, [done(first, "tile")])
    if step.finetune is not None:
        previous = round_paths(out, step.index - 1)
        start = [step.finetune.encoder.weights] if step.finetune.encoder.weights else []
        stages.run("finetune", lambda: finetune(step.finetune), step.finetune,
                   [done(previous, "mine"), previous.selection, *start])
    upstream = [done(first, "tile"), *([done(here, "pretrain")] if step.pretrain is not None else []),
                *([done(here, "finetune")] if step.finetune is not None else [])]
    stages.run("extract", lambda: run_extract(step.extract), step.extract, upstream)
    stages.run("fit", lambda: fit(step.fit), step.fit.recorded(), [args.mil_config, done(here, "extract")],
               partial=here.mil)
    for seed, command in step.fit_seeds.items():
        stages.run(f"fit_seed{seed}", lambda command=command: fit(command), command.recorded(),
                   [args.mil_config, done(here, "extract")], partial=here.mil_seed(seed))
    if step.ensemble is not None:
        stages.run("ensemble", lambda: ensemble(step.ensemble), step.ensemble,
                   [done(here, "fit"), *(done(here, f"fit_seed{seed}") for seed in step.fit_seeds)],
                   partial=here.mil_ensemble)
    reported = done(here, "ensemble" if step.ensemble is not None else "fit")
    stages.run("predict_train", lambda: predict(step.predict.updated({"ckpt_path": best_checkpoint(here.mil)})),
               step.predict.recorded(), [done(here, "fit")], partial=here.mil_train)
    stages.run("evaluate", lambda: evaluate(step.evaluate), yaml_texts(step.evaluate_given), [reported])
    stages.run("mine", lambda: mine(step.mine), step.mine, [done(here, "predict_train"), done(here, "extract")])
    return summary_row(step.index, here, stages.seconds, step.evaluated)


def summary_row(index: int, here: RoundPaths, seconds: dict[str, float], evaluated: Path) -> dict[str, Any]:
    """The round's numbers, from the run it reports (``evaluated``: the seed ensemble, or the first fit)."""
    metrics = _json(evaluated / "metrics.json")
    slide = metrics.get("slide", {})
    patch = metrics.get("patch", {})
    test_auc = slide.get("metrics", {}).get("auc", {}) if slide.get("evaluated_split") == "test" else {}
    quality = _json(here.root / "selection_quality.json")
    selection = pd.read_csv(here.selection) if here.selection.is_file() else pd.DataFrame({"kind": []})
    counts = selection["kind"].value_counts()
    row: dict[str, Any] = {
        "round": index,
        # The written validation predictions' AUC (the same slide score as the test column); the fit's own record
        # of its selection metric where metrics.json has no validation section.
        "val_slide_auc": slide.get("validation", {}).get("metrics", {}).get(
            "auc", _json(here.mil / "fit_summary.json").get("best_val_auc")),
        "test_slide_auc": _get(test_auc, "value", "estimate", "point"),
        "test_slide_auc_low": _get(test_auc, "low", "lower", "ci_low"),
        "test_slide_auc_high": _get(test_auc, "high", "upper", "ci_high"),
        "test_patch_auc": patch.get("pooled_auc"),
        "test_tumor_vs_lookalike_auc": patch.get("tumor_vs_lookalike_auc"),
        # How many slide models those numbers average (the seed ensemble's members, or the one fit).
        "slide_models": len(_json(evaluated / ENSEMBLE_NAME).get("members", [None])),
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


def validation_tie(table: pd.DataFrame) -> str | None:
    """A one-line warning when the chosen round's validation AUC is shared by another round (None otherwise).

    With a handful of validation slides AUC often reads 1.00 in every round; ``chosen_on_val`` then keeps the
    earliest, which says nothing about whether the refresh helped, and the reader should know.
    """
    val = pd.to_numeric(table["val_slide_auc"], errors="coerce")
    if not table["chosen_on_val"].any() or val.notna().sum() < 2:
        return None
    best = val[table["chosen_on_val"]].iloc[0]
    tied = table.loc[val == best, "round"].tolist()
    if len(tied) < 2:
        return None
    return (f"validation AUC {best:.3f} in rounds {', '.join(map(str, tied))}: validation cannot tell these rounds "
            f"apart, so chosen_on_val keeps round {tied[0]}; judge the refresh on more validation slides or folds "
            "(--cohort.fold)")


def tied_fits(out: Path, rounds: list[int]) -> str | None:
    """One line when validation did not choose the epoch kept by some of the loop's slide-model fits (their
    ``fit_summary.json`` lists several epochs tied with it, and the first was kept); None otherwise."""
    runs = [path.parent for index in rounds for path in sorted((out / f"round_{index}").glob(f"*/{FIT_SUMMARY}"))]
    return tied_fits_warning(runs, "more validation slides or folds (--cohort.fold) let it, or "
                                   "mil_options.checkpoint.tie_breaker: val_loss keeps the lowest-loss tied epoch")


def main(argv: list[str] | None = None) -> None:
    run(parse(HNMArgs, argv, "mil hnm", __doc__ or ""))


def run(args: HNMArgs) -> pd.DataFrame:
    """Check every stage's settings and the folder's provenance first, then run (or resume) the rounds."""
    rounds = plan(args)
    prepare_folder(args)
    out = Path(args.out)
    with tied_epoch_warnings_held():  # one line for all the loop's fits, below
        rows = [run_round(args, step) for step in rounds]
    table = write_summary(out, rows)
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for warning in (validation_tie(table), tied_fits(out, [step.index for step in rounds])):
        if warning:
            print(f"warning: {warning}")
    print(f"\nwrote {out / SUMMARY_NAME}")
    return table
