"""``metrics.json`` and ``roc.png`` for a run directory, from the predictions files it holds.

Thresholds are chosen on the validation predictions only (a fixed 0.5 and Youden's J), then applied to the
evaluated split (test when it exists, else validation, which is then flagged as optimistic). Every metric
carries a stratified bootstrap 95% interval over slides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.errors import InputError
from features.provenance import versions
from features.store import atomic_path
from mil.evaluation.bootstrap import DEFAULT_LEVEL, DEFAULT_N, MIN_PER_CLASS, bootstrap
from mil.evaluation.metrics import binary_statistic, multiclass_statistic
from mil.evaluation.thresholds import FIXED, youden_threshold

METRICS_NAME = "metrics.json"
ROC_NAME = "roc.png"
VAL_FILE, TEST_FILE, ALL_FILE = "predictions_val.csv", "predictions_test.csv", "predictions.csv"
BINARY_NAMES = {"normal": 0, "negative": 0, "benign": 0, "tumor": 1, "tumour": 1, "positive": 1, "malignant": 1}
FIXED_NAME, YOUDEN_NAME = "threshold_0.5", "youden_val"


@dataclass
class Predictions:
    """Labelled slide predictions as arrays: ``scores`` is (N,) for binary, (N, C) probabilities otherwise."""

    slide_ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    classes: list[str]
    source: str

    @property
    def binary(self) -> bool:
        return self.scores.ndim == 1

    def __len__(self) -> int:
        return len(self.labels)


def read_predictions_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: predictions file not found; run `mil test` (or `mil fit`) first")
    frame = pd.read_csv(path, dtype={"slide_id": str})
    missing = {"slide_id", "label", "score"} - set(frame.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {sorted(missing)}; expected slide_id,label,score[,split]")
    return frame


def to_predictions(frame: pd.DataFrame, source: str) -> Predictions:
    """Arrays from a predictions table; rows without a label (empty or negative: ``mil predict`` on unlabelled
    slides) are dropped."""
    numeric = pd.to_numeric(frame["label"], errors="coerce")
    unlabelled = frame["label"].isna() | (frame["label"].astype(str).str.strip() == "") | (numeric < 0)
    frame = frame[~unlabelled]
    classes = [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
    if len(classes) > 2:
        scores = frame[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
        labels = _class_indices(frame["label"], classes, source)
    else:
        scores = frame["score"].to_numpy(dtype=float)
        labels = _binary_labels(frame["label"], source)
        classes = classes or ["0", "1"]
    if not np.all(np.isfinite(scores)):
        raise InputError(f"{source}: non-finite scores; check the model outputs")
    return Predictions(frame["slide_id"].to_numpy(str), labels, scores, classes, source)


def _binary_labels(column: pd.Series, source: str) -> np.ndarray:
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().all():
        labels = numeric.to_numpy().astype(int)
    else:
        names = column.astype(str).str.strip().str.lower()
        unknown = sorted(set(names) - set(BINARY_NAMES))
        if unknown:
            raise InputError(f"{source}: labels {unknown} are not binary names; use 0/1 or normal/tumor")
        labels = names.map(BINARY_NAMES).to_numpy().astype(int)
    if not set(np.unique(labels)) <= {0, 1}:
        raise InputError(f"{source}: binary labels must be 0 or 1, got {sorted(set(labels))}; "
                         "multi-class predictions need prob_<class> columns")
    return labels


def _class_indices(column: pd.Series, classes: list[str], source: str) -> np.ndarray:
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().all():
        labels = numeric.to_numpy().astype(int)
    else:
        lookup = {name: index for index, name in enumerate(classes)}
        names = column.astype(str).str.strip()
        unknown = sorted(set(names) - set(lookup))
        if unknown:
            raise InputError(f"{source}: labels {unknown} have no prob_<label> column")
        labels = names.map(lookup).to_numpy().astype(int)
    if labels.min() < 0 or labels.max() >= len(classes):
        raise InputError(f"{source}: label indices must lie in 0..{len(classes) - 1}")
    return labels


def run_predictions(run_dir: str | Path) -> tuple[Predictions | None, Predictions | None, str]:
    """(validation, evaluated, evaluated split name) from the predictions files of a run directory."""
    run_dir = Path(run_dir)
    frames: dict[str, tuple[pd.DataFrame, str]] = {}
    for split, name in (("val", VAL_FILE), ("test", TEST_FILE)):
        if (run_dir / name).is_file():
            frames[split] = (read_predictions_csv(run_dir / name), str(run_dir / name))
    if (run_dir / ALL_FILE).is_file():
        combined = read_predictions_csv(run_dir / ALL_FILE)
        if "split" in combined.columns:
            for split in ("val", "test"):
                rows = combined[combined["split"].astype(str) == split]
                if split not in frames and len(rows):
                    frames[split] = (rows, f"{run_dir / ALL_FILE} (split={split})")
        elif "test" not in frames:
            frames["predictions"] = (combined, str(run_dir / ALL_FILE))
    val = to_predictions(*frames["val"]) if "val" in frames else None
    for split in ("test", "predictions"):
        if split in frames:
            return val, to_predictions(*frames[split]), split
    return val, val, "val"


def choose_thresholds(val: Predictions | None) -> tuple[dict[str, float], str]:
    """0.5 always; Youden's J on validation when validation predictions with both classes exist."""
    thresholds = {FIXED_NAME: FIXED}
    if val is None:
        return thresholds, "no validation predictions: only the fixed 0.5 threshold is reported"
    if len(np.unique(val.labels)) < 2:
        return thresholds, "validation predictions hold one class: only the fixed 0.5 threshold is reported"
    thresholds[YOUDEN_NAME] = youden_threshold(val.labels, val.scores)
    return thresholds, f"chosen on validation ({val.source})"


def evaluate(evaluated: Predictions, val: Predictions | None, split: str, n_resamples: int = DEFAULT_N,
             seed: int = 0, level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """The ``slide`` section of metrics.json: point estimates and intervals on ``evaluated``."""
    notes = []
    if evaluated.binary:
        thresholds, source = choose_thresholds(val)
        statistic = binary_statistic(thresholds)
    else:
        thresholds, source = {}, "argmax of class probabilities (no threshold)"
        statistic = multiclass_statistic
    if split == "val":
        notes.append("no test predictions: metrics are on validation, the split the thresholds were chosen on, "
                     "so they are optimistic")
    if len(np.unique(evaluated.labels)) < 2:
        notes.append("the evaluated split holds one class: AUC and some ratios are undefined (null)")
    intervals = bootstrap(statistic, evaluated.labels, evaluated.scores, n_resamples, seed, level)
    counts = {evaluated.classes[c] if c < len(evaluated.classes) else str(c): int(n)
              for c, n in zip(*np.unique(evaluated.labels, return_counts=True))}
    single = [name for name, n in counts.items() if n < MIN_PER_CLASS]
    if single and n_resamples > 0:
        notes.append(f"the evaluated split has a single slide of class {' and of class '.join(single)}: a "
                     "bootstrap cannot resample a class of one, so intervals are undefined (null) and the point "
                     "values rest on single slides; evaluate on more slides, or over folds with `mil cv`")
    section: dict[str, Any] = {
        "task": "binary" if evaluated.binary else "multiclass",
        "classes": evaluated.classes,
        "evaluated_split": split,
        "evaluated_file": evaluated.source,
        "n_slides": len(evaluated),
        "class_counts": counts,
        "thresholds": thresholds,
        "threshold_source": source,
        "metrics": {name: interval.as_dict() for name, interval in intervals.items()},
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "level": level, "stratified_by": "label",
                      "interval": "percentile"},
        "notes": notes,
    }
    if val is not None and split != "val":
        section["validation"] = {"n_slides": len(val),
                                 "metrics": {k: _round(v) for k, v in statistic(val.labels, val.scores).items()}}
    return section


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def merge_metrics(path: str | Path, update: dict[str, Any]) -> dict[str, Any]:
    """Update top-level sections of a metrics.json (keeping the others) and write it atomically."""
    path = Path(path)
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: not valid JSON ({error}); delete it and rerun")
    current.update(update)
    current["versions"] = versions()
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return current


def write_slide_metrics(out_dir: str | Path, evaluated: Predictions, val: Predictions | None, split: str,
                        n_resamples: int = DEFAULT_N, seed: int = 0) -> dict[str, Any]:
    """Evaluate, merge the ``slide`` section into ``out_dir/metrics.json`` and draw ``out_dir/roc.png``."""
    from mil.evaluation.roc import plot_roc

    out_dir = Path(out_dir)
    section = evaluate(evaluated, val, split, n_resamples, seed)
    metrics = merge_metrics(out_dir / METRICS_NAME, {"slide": section})
    curves = {split: (evaluated.labels, evaluated.scores)}
    if val is not None and split != "val":
        curves["val"] = (val.labels, val.scores)
    plot_roc(out_dir / ROC_NAME, curves, section["thresholds"], title=f"ROC ({split}, n={len(evaluated)})",
             n_resamples=n_resamples, seed=seed)
    return metrics


def write_run_metrics(run_dir: str | Path, n_resamples: int = DEFAULT_N, seed: int = 0) -> dict[str, Any]:
    """Read a run directory's predictions, write ``metrics.json`` (merged) and ``roc.png``; return the metrics."""
    run_dir = Path(run_dir)
    val, evaluated, split = run_predictions(run_dir)
    if evaluated is None:
        raise InputError(f"{run_dir}: no {VAL_FILE}, {TEST_FILE} or {ALL_FILE}; run `mil fit` or `mil test` first")
    if len(evaluated) == 0:
        raise InputError(f"{evaluated.source}: no labelled slides to evaluate")
    return write_slide_metrics(run_dir, evaluated, val, split, n_resamples, seed)


def format_slide_table(section: dict[str, Any]) -> str:
    """A readable markdown table of the ``slide`` section."""
    ci = f"{section['bootstrap']['level']:.0%} CI"  # the label comes from the level the bounds were computed at
    lines = [f"slide metrics on {section['evaluated_split']} (n={section['n_slides']}, "
             f"{section['bootstrap']['n_resamples']} stratified bootstrap resamples, {ci})",
             "thresholds: " + (", ".join(f"{k}={v:.4g}" for k, v in section["thresholds"].items()) or "argmax")
             + f" ({section['threshold_source']})", "",
             f"| metric | value | {ci} |", "|---|---|---|"]
    for name, m in section["metrics"].items():
        lines.append(f"| {name} | {_fmt(m['value'])} | [{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}] |")
    lines += [f"note: {note}" for note in section.get("notes", [])]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
