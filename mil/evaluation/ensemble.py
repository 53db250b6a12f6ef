"""``mil ensemble``: one run directory whose slide predictions are the mean of several runs'.

    mil ensemble --runs [runs/abmil_seed0,runs/abmil_seed1,runs/abmil_seed2] --out runs/abmil_ensemble

With a handful of validation slides, which epoch (and which seed) a slide model keeps is close to chance: its
validation AUC often reads 1.00 from the first epoch on. Averaging a few seeds' outputs takes most of that chance
out of the test numbers. Slide probabilities (``score`` and any ``prob_<class>``) are averaged, slides joined on
their ids. Patch scores are the first run's by default: each member's instance head puts its logits on its own
scale, so one member with wide logits would rank the patches of the mean, and on fresh synthetic cohorts the
mean's patch AUC fell below the first fit's (docs/method.md). ``--patch_scores mean`` averages the logits (and
``attention`` where every member has it), patches joined on their coordinates, never on row order. The result
reads like a run to ``mil evaluate``, ``mil heatmap``, ``mil qupath`` and ``mil view``; ``ensemble.json``
records the members, their seeds and best checkpoints, the patch-score mode and the software; ``config.yaml``
holds only the ``data`` settings the members share.

The members must have scored the same slides with the same labels, splits, features and labels file; anything
else is refused in one line, since a mean over different data is a number that looks right and is not.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from features.errors import InputError
from features.options import parse
from features.provenance import refuse_other_features, versions
from features.store import HOST, TMP_MARKER
from mil.evaluation.report import read_predictions_csv
from mil.patch_scores import (PATCH_SCORES_DIR, find_patch_scores, read_patch_scores, scored_feature_settings,
                              write_patch_scores)

ENSEMBLE_NAME = "ensemble.json"
PREDICTION_FILES = ("predictions_val.csv", "predictions_test.csv", "predictions.csv")
# What must agree between members: the data they read. Seeds, models and trainer settings may differ.
DATA_KEYS = ("features", "labels", "fold", "label_map")
PATCH_MODES = ("first", "mean")


@dataclass
class EnsembleArgs:
    """What ``mil ensemble`` reads and writes."""

    runs: list[str]
    """Run directories of `mil fit` (or `mil test`), each with predictions CSVs and patch_scores/."""
    out: str
    """Run directory to write: the mean predictions, patch_scores/ and ensemble.json."""
    patch_scores: str = "first"
    """``first``: the first run's patch scores, as they are; ``mean``: the mean logit (and attention) per patch."""


def main(argv: list[str] | None = None) -> None:
    written = ensemble(parse(EnsembleArgs, argv, "mil ensemble", __doc__ or ""))
    print(f"wrote {written}")


def ensemble(args: EnsembleArgs) -> Path:
    """Average the members' outputs into ``args.out`` (written whole under a temporary name, then renamed)."""
    if args.patch_scores not in PATCH_MODES:
        raise InputError(f"--patch_scores {args.patch_scores!r}: choose first or mean")
    runs = [Path(run) for run in args.runs]
    if len(runs) < 2:
        raise InputError("mil ensemble: pass at least two --runs; one run is already its own result")
    out = Path(args.out)
    if out.resolve() in {run.resolve() for run in runs}:
        raise InputError(f"{out}: --out is one of the --runs; write the ensemble to a new folder")
    if out.exists() and not (out / ENSEMBLE_NAME).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not a `mil ensemble` folder (no {ENSEMBLE_NAME}); pass a new --out, "
                         "nothing there is replaced")
    for run in runs:
        if not run.is_dir():
            raise InputError(f"{run}: run directory not found; pass the --trainer.default_root_dir of a `mil fit` run")
    configs = [read_config(run) for run in runs]
    data = [data_settings(config) for config in configs]
    for run, settings in zip(runs[1:], data[1:]):
        for key in DATA_KEYS:
            if settings.get(key) != data[0].get(key):
                raise InputError(f"{run}: data.{key} is {settings.get(key)!r} but {runs[0]} read {data[0].get(key)!r}; "
                                 "ensemble only runs of the same features, labels and fold")
    made = [member_features(run) for run in runs]  # the same folder may have been re-extracted between fits
    for run, settings in zip(runs[1:], made[1:]):
        refuse_other_features(made[0], settings or {}, str(run), f"{runs[0]} read features with",
                              "ensemble only runs of the same features")
    # Named like every other temporary of this project, so a killed run's leftover is recognised and cleaned.
    tmp = out.with_name(f"{out.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}-{HOST}")
    tmp.mkdir(parents=True)
    try:
        written = [name for name in PREDICTION_FILES if mean_predictions(runs, name, tmp / name)]
        if not written:
            raise InputError(f"{runs[0]}: holds no predictions CSV; run `mil fit` or `mil test` first")
        n_slides = mean_patch_scores(runs, tmp) if args.patch_scores == "mean" else copy_patch_scores(runs[0], tmp)
        record = {"members": [str(run) for run in runs], "data": data[0], "feature_settings": made[0],
                  "prediction_files": written,
                  "patch_scores": args.patch_scores, "patch_score_slides": n_slides,
                  "member_settings": [member_settings(run, config) for run, config in zip(runs, configs)],
                  "versions": versions(), "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (tmp / ENSEMBLE_NAME).write_text(json.dumps(record, indent=1) + "\n")
        # Only the data every member shares: what readers of a run (the viewer, another ensemble) look up there.
        (tmp / "config.yaml").write_text(f"# mil ensemble of {len(runs)} runs (members: {ENSEMBLE_NAME})\n"
                                         + yaml.safe_dump({"data": data[0]}, sort_keys=False))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def data_settings(config: dict) -> dict:
    """The ``data`` settings a member read (from the config.yaml LightningCLI saved)."""
    values = config.get("data") or {}
    return {key: values.get(key) for key in DATA_KEYS}


def member_settings(run: Path, config: dict) -> dict:
    """Seed, model and best checkpoint of a member, so the ensemble can be traced to its parts."""
    summary = run / "fit_summary.json"
    return {"run": str(run), "seed_everything": config.get("seed_everything"),
            "data_seed": (config.get("data") or {}).get("seed"), "model": config.get("model"),
            "fit_summary": json.loads(summary.read_text()) if summary.is_file() else None}


def member_features(run: Path) -> dict | None:
    """Settings of the features a member was trained on (its last checkpoint), else those its scores came from."""
    from mil.training.cli import CHECKPOINTS, LAST, trained_feature_settings  # Lightning: only when a member is read

    checkpoint = run / CHECKPOINTS / LAST
    if checkpoint.is_file():
        return trained_feature_settings(checkpoint)
    if (run / PATCH_SCORES_DIR).is_dir():
        return scored_feature_settings(find_patch_scores(run))
    return None


def read_config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        raise InputError(f"{path}: not found; ensemble runs made by `mil fit`, which saves its config there")
    return yaml.safe_load(path.read_text()) or {}


def mean_predictions(runs: list[Path], name: str, target: Path) -> bool:
    """Mean slide probabilities of one predictions file; False when no member has it (all must, or none)."""
    present = [(run / name).is_file() for run in runs]
    if not any(present):
        return False
    if not all(present):
        missing = runs[present.index(False)]
        raise InputError(f"{missing / name}: missing while {runs[present.index(True)] / name} exists; "
                         "rerun `mil test` so every member scored the same splits")
    tables = [read_predictions_csv(run / name).set_index("slide_id") for run in runs]
    first = tables[0]
    probabilities = [c for c in first.columns if c == "score" or c.startswith("prob_")]
    keys = [c for c in ("label", "split") if c in first.columns]
    for run, table in zip(runs[1:], tables[1:]):
        if set(table.index) != set(first.index) or table.index.duplicated().any():
            raise InputError(f"{run / name}: scores other slides than {runs[0] / name}; ensemble runs of one cohort")
        if sorted(c for c in table.columns if c == "score" or c.startswith("prob_")) != sorted(probabilities):
            raise InputError(f"{run / name}: has other score columns than {runs[0] / name}; ensemble runs with the "
                             "same classes")
        aligned = table.loc[first.index]
        for key in keys:
            if not aligned[key].astype(str).equals(first[key].astype(str)):
                raise InputError(f"{run / name}: {key} of some slides differs from {runs[0] / name}; ensemble runs "
                                 "of the same labels and split")
    mean = first.copy()
    mean[probabilities] = np.mean([table.loc[first.index, probabilities].to_numpy(float) for table in tables], axis=0)
    mean.reset_index().to_csv(target, index=False)
    return True


def copy_patch_scores(run: Path, out: Path) -> int:
    """The first run's patch_scores/ as they are (``--patch_scores first``); returns the slides copied."""
    if not (run / PATCH_SCORES_DIR).is_dir():
        return 0
    shutil.copytree(run / PATCH_SCORES_DIR, out / PATCH_SCORES_DIR)
    return len(find_patch_scores(out))


def mean_patch_scores(runs: list[Path], out: Path) -> int:
    """Mean patch logits (and attention, where every member has it) per slide; returns the slides written."""
    if not all((run / PATCH_SCORES_DIR).is_dir() for run in runs):
        if any((run / PATCH_SCORES_DIR).is_dir() for run in runs):
            raise InputError(f"{runs[0]}: some members have patch_scores/ and some do not; rerun `mil test` for all")
        return 0
    files = [find_patch_scores(run) for run in runs]
    for run, found in zip(runs[1:], files[1:]):
        if set(found) != set(files[0]):
            raise InputError(f"{run / PATCH_SCORES_DIR}: scores other slides than {runs[0] / PATCH_SCORES_DIR}; "
                             "ensemble runs of one cohort")
    made_from = scored_feature_settings(files[0])
    for slide_id in sorted(files[0]):
        coords, scores, attention = read_member(files[0][slide_id])
        order = {tuple(xy): i for i, xy in enumerate(coords.tolist())}
        score_sum, attention_parts = scores.copy(), [attention]
        for found in files[1:]:
            other_coords, other_scores, other_attention = read_member(found[slide_id])
            rows = np.array([order.get(tuple(xy), -1) for xy in other_coords.tolist()], dtype=np.int64)
            if len(rows) != len(coords) or (rows < 0).any() or len(np.unique(rows)) != len(rows):
                raise InputError(f"{found[slide_id]}: other patches than {files[0][slide_id]}; ensemble runs of "
                                 "the same features")
            score_sum[rows] += other_scores
            if other_attention is not None and attention_parts[0] is not None:
                aligned = np.empty_like(other_attention)
                aligned[rows] = other_attention
                attention_parts.append(aligned)
            else:
                attention_parts = [None]
        mean_attention = None if attention_parts[0] is None else np.mean(attention_parts, axis=0)
        write_patch_scores(out, slide_id, coords, score_sum / len(runs), mean_attention, made_from)
    return len(files[0])


def read_member(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(coords, logits, attention or None) of one member's patch-scores file, through the format's own reader."""
    coords, scores = read_patch_scores(path, "instance")
    try:
        attention = read_patch_scores(path, "attention")[1]
    except InputError:
        attention = None  # models without attention write instance scores only
    return coords, scores, attention
