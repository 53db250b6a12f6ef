"""``features regimes``: which negatives are worth training on?

After Lafarge & Koelzer (MIDOG 2022): a first head scores every candidate negative of the training split;
each regime then keeps all positives, the hardest ``hard``% of the negatives (highest first-head score) and
``random``% more drawn at random from the rest, and trains a fresh head of the same size. Each regime is
trained ``repeats`` times (other random draws, other head seeds) and the regime with the best *mean*
validation F1 wins (ties: the one using fewer patches): one seed's F1 on a small validation set is too noisy
to rank regimes. Two baselines use the same head and the same repeats: all negatives, and random negatives in
the number the chosen regime used. The output says whether the chosen regime beat both; test metrics are only
reported, never used to choose.

Candidate negatives are scored out-of-fold (``folds`` heads, each scoring the negatives it did not see), so a
negative is hard because it resembles positives, not because the first head failed to memorise it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from features.errors import InputError
from features.heads.data import EmbeddingSet
from features.heads.train import (HeadConfig, best_f1_threshold, binary_metrics, predict_proba, train_head)
from features.store import atomic_path

ALL_NEGATIVES = "all negatives"
RANDOM_SAME_SIZE = "random negatives (same size)"
METRICS = ("val_f1", "val_auroc", "val_balanced_accuracy", "test_f1", "test_auroc", "test_balanced_accuracy",
           "threshold")


@dataclass
class RegimeGrid:
    hard: list[float] = field(default_factory=lambda: [5.0, 10.0, 25.0, 50.0])
    """Percentages of the hardest negatives to add, one regime each."""
    random: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 25.0])
    """Percentages of further negatives drawn at random, one regime each."""
    folds: int = 3
    """Out-of-fold scoring of candidates; 1 scores with a head trained on all of them."""
    repeats: int = 3
    """Fits per regime and baseline (draw seed (seed, k), head seed head.seed + k); means compared."""
    seed: int = 0
    """Seeds the draws of each regime."""


def negative_scores(train: EmbeddingSet, head: HeadConfig, folds: int, seed: int = 0) -> np.ndarray:
    """First-head positive scores of every training row (only negatives' scores are used)."""
    scores = np.zeros(len(train), dtype=np.float64)
    if folds <= 1:
        return predict_proba(train_head(train, head).module, train.features)[:, 1]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, held_rows in splitter.split(train.features, train.labels):
        module = train_head(train.subset(fit_rows), head).module
        scores[held_rows] = predict_proba(module, train.features[held_rows])[:, 1]
    return scores


def regime_rows(labels: np.ndarray, scores: np.ndarray, hard_pct: float, random_pct: float,
                rng: np.random.Generator) -> np.ndarray:
    """Training rows of one regime: every positive, the hardest negatives, then random others."""
    negatives = np.flatnonzero(labels == 0)
    by_hardness = negatives[np.argsort(-scores[negatives], kind="stable")]
    n_hard = int(round(len(negatives) * min(hard_pct, 100.0) / 100))
    rest = by_hardness[n_hard:]
    n_random = min(len(rest), int(round(len(negatives) * random_pct / 100)))
    chosen = np.concatenate([by_hardness[:n_hard], rng.choice(rest, n_random, replace=False)])
    return np.sort(np.concatenate([np.flatnonzero(labels == 1), chosen]))


def fit_once(train: EmbeddingSet, rows: np.ndarray, head: HeadConfig, val: EmbeddingSet,
             test: EmbeddingSet | None) -> dict:
    """One head on ``rows`` of ``train``: threshold and metrics on val, the same threshold on test."""
    part = train.subset(rows)
    module = train_head(part, head).module
    val_scores = predict_proba(module, val.features)[:, 1]
    threshold = best_f1_threshold(val_scores, val.labels)
    run = {"threshold": threshold, **{f"val_{k}": v for k, v in binary_metrics(val_scores, val.labels, threshold).items()}}
    if test is not None and len(test):
        test_scores = predict_proba(module, test.features)[:, 1]
        run.update({f"test_{k}": v for k, v in binary_metrics(test_scores, test.labels, threshold).items()})
    if "source" in part.table.columns:
        run.update({f"neg_{k}": v for k, v in part.table.loc[part.labels == 0, "source"].value_counts().items()})
    return run


def fit_regime(name: str, train: EmbeddingSet, draw: Callable[[np.random.Generator], np.ndarray],
               head: HeadConfig, val: EmbeddingSet, test: EmbeddingSet | None, repeats: int = 1,
               seed: int = 0) -> dict:
    """Mean and standard deviation over ``repeats`` fits; repeat k draws rows with rng (seed, k), head seed + k."""
    start = time.perf_counter()
    runs, sizes = [], []
    for k in range(repeats):
        rows = draw(np.random.default_rng([seed, k]))
        sizes.append((len(rows), int((train.labels[rows] == 1).sum())))
        runs.append(fit_once(train, rows, replace(head, seed=head.seed + k), val, test))
    frame = pd.DataFrame(runs)
    n_rows, n_pos = sizes[0]
    row = {"regime": name, "n_positives": n_pos, "n_negatives": n_rows - n_pos, "fraction": n_rows / len(train),
           "repeats": repeats}
    for metric in (m for m in METRICS if m in frame.columns):
        row[metric] = float(frame[metric].mean())
        row[f"{metric}_std"] = float(frame[metric].std(ddof=0))
    sources = sorted(c for c in frame.columns if c.startswith("neg_"))
    if sources:  # mean count per source: how many imposters, random and unlabeled-image negatives it used
        row["negatives_by_source"] = " ".join(f"{c[4:]}:{round(frame[c].fillna(0).mean(), 1):g}" for c in sources)
    row["seconds"] = time.perf_counter() - start
    return row


def grid_points(grid: RegimeGrid) -> list[tuple[float, float]]:
    """(hard, random) pairs; percentages past 100 select nothing more, so pairs that repeat another are dropped."""
    return list(dict.fromkeys((min(h, 100.0), min(r, 100.0 - min(h, 100.0))) for h in grid.hard
                              for r in grid.random if h + r > 0))


def search_regimes(data: EmbeddingSet, head: HeadConfig, grid: RegimeGrid) -> pd.DataFrame:
    """One row per regime and baseline; ``chosen`` marks the regime picked on mean validation F1."""
    train, val = data.split("train"), data.split("val")
    test = data.split("test") if (data.table["split"] == "test").any() else None
    if len(val) == 0 or len(np.unique(val.labels)) < 2:
        raise InputError("patch table: the val split needs positives and negatives to choose a regime")
    if len(data.classes) != 2:
        raise InputError(f"regime search is binary; the patch table has {len(data.classes)} classes")
    if grid.repeats < 1:
        raise InputError(f"--grid.repeats {grid.repeats}: train each regime at least once")
    scores = negative_scores(train, head, grid.folds, grid.seed)
    labels = train.labels

    def fit(name: str, hard: float, random: float, kind: str) -> dict:
        draw = lambda rng: regime_rows(labels, scores, hard, random, rng)  # noqa: E731
        return fit_regime(name, train, draw, head, val, test, grid.repeats, grid.seed) | {
            "hard_pct": hard, "random_pct": random, "kind": kind}

    rows = [fit(f"hard{h:g}+random{r:g}", h, r, "regime")
            for h, r in tqdm(grid_points(grid), desc="regimes", unit="regime")]
    table = pd.DataFrame(rows)
    best = table.sort_values(["val_f1", "fraction"], ascending=[False, True], kind="stable").index[0]
    same_size_pct = 100.0 * int(table.loc[best, "n_negatives"]) / max(1, int((labels == 0).sum()))
    baselines = pd.DataFrame([fit(ALL_NEGATIVES, 0.0, 100.0, "baseline"),
                              fit(RANDOM_SAME_SIZE, 0.0, same_size_pct, "baseline")])
    table = pd.concat([table, baselines], ignore_index=True)
    table["chosen"] = table.index == best
    table["beats_baselines"] = np.where(table["chosen"], bool(beats_baselines(table)["beats_both"]), None)
    front = ["regime", "kind", "chosen", "beats_baselines", "hard_pct", "random_pct", "fraction", "repeats",
             "n_positives", "n_negatives", "val_f1", "val_f1_std"]
    return table[front + [c for c in table.columns if c not in front]]


def beats_baselines(table: pd.DataFrame) -> dict:
    """The chosen regime against each baseline on mean validation F1 (test F1 beside it, for the record)."""
    chosen = table[table["chosen"]].iloc[0]
    summary = {"chosen": chosen["regime"], "val_f1": chosen["val_f1"], "val_f1_std": chosen["val_f1_std"],
               "fraction": chosen["fraction"], "test_f1": chosen.get("test_f1", float("nan"))}
    beats = []
    for name, key in ((ALL_NEGATIVES, "all_negatives"), (RANDOM_SAME_SIZE, "random_negatives")):
        base = table[table["regime"] == name].iloc[0]
        beats.append(bool(chosen["val_f1"] > base["val_f1"]))
        summary[key] = {"val_f1": base["val_f1"], "val_f1_std": base["val_f1_std"], "fraction": base["fraction"],
                        "test_f1": base.get("test_f1", float("nan")), "beaten": beats[-1],
                        "val_f1_margin": chosen["val_f1"] - base["val_f1"]}
    summary["beats_both"] = all(beats)
    return summary


def _mean_std(table: pd.DataFrame, metric: str) -> pd.Series:
    return table[metric].map("{:.3f}".format) + " ± " + table[f"{metric}_std"].map("{:.3f}".format)


def format_table(table: pd.DataFrame) -> str:
    shown = table[[c for c in ("regime", "chosen", "fraction", "n_negatives") if c in table.columns]].copy()
    for metric in ("val_f1", "val_auroc", "test_f1"):
        if metric in table.columns:
            shown[metric] = _mean_std(table, metric)
    shown["seconds"] = table["seconds"]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def verdict(table: pd.DataFrame) -> str:
    """One line: the chosen regime, its share of patches, and whether it beat both baselines on validation."""
    s = beats_baselines(table)
    all_neg, rand = s["all_negatives"], s["random_negatives"]
    return (f"chosen: {s['chosen']} using {100 * s['fraction']:.1f}% of the training patches, val F1 "
            f"{s['val_f1']:.3f} ± {s['val_f1_std']:.3f}; all negatives {all_neg['val_f1']:.3f} ± "
            f"{all_neg['val_f1_std']:.3f}, random negatives of the same size {rand['val_f1']:.3f} ± "
            f"{rand['val_f1_std']:.3f}; beats both: {'yes' if s['beats_both'] else 'no'}")


def write_results(out_dir: str | Path, table: pd.DataFrame, settings: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "regimes.csv") as tmp:
        table.to_csv(tmp, index=False)
    baselines = {row["regime"]: row for row in table[table["kind"] == "baseline"].to_dict("records")}
    result = {"chosen": table[table["chosen"]].iloc[0].to_dict(), "baselines": baselines,
              "comparison": beats_baselines(table), "settings": settings}
    with atomic_path(out_dir / "regimes.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=_plain))
    return out_dir / "regimes.csv"


def _plain(value):
    """numpy scalars to JSON numbers (anything else as text)."""
    return value.item() if hasattr(value, "item") else str(value)


def regimes_parser():
    from features.heads.cli import build_parser

    parser = build_parser("features regimes", __doc__.splitlines()[0])
    parser.add_class_arguments(RegimeGrid, "grid")
    return parser


def main(argv: list[str]) -> None:
    """``features regimes --data.embeddings DIR --data.table CSV --out DIR [--grid.hard [..]] [--head.*]``."""
    from features.heads.cli import load_data

    parser = regimes_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    data = load_data(init.data, cfg.out)
    head: HeadConfig = init.head
    grid: RegimeGrid = init.grid
    table = search_regimes(data, head, grid)
    print(format_table(table))
    path = write_results(cfg.out, table, {"head": asdict(head), "grid": asdict(grid), "data": str(cfg.data)})
    print(f"{verdict(table)}; wrote {path}")
