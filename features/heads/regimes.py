"""``features regimes``: which negatives are worth training on?

After Lafarge & Koelzer (MIDOG 2022): a first head scores every candidate negative of the training split;
each regime then keeps all positives, the hardest ``hard``% of the negatives (highest first-head score) and
``random``% more drawn at random from the rest, and trains a fresh head of the same size. The regime with the
best validation F1 wins (ties: the one using fewer patches). Two baselines use the same head: all negatives,
and random negatives in the number the chosen regime used.

Candidate negatives are scored out-of-fold (``folds`` heads, each scoring the negatives it did not see), so a
negative is hard because it resembles positives, not because the first head failed to memorise it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from features.errors import InputError
from features.heads.data import EmbeddingSet
from features.heads.train import (HeadConfig, best_f1_threshold, binary_metrics, predict_proba, train_head)
from features.store import atomic_path


@dataclass
class RegimeGrid:
    hard: list[float] = field(default_factory=lambda: [5.0, 10.0, 25.0, 50.0])   # % hardest negatives
    random: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 25.0])  # % more at random
    folds: int = 3        # out-of-fold scoring of candidates; 1 scores with a head trained on all of them
    seed: int = 0


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


def fit_regime(name: str, train: EmbeddingSet, rows: np.ndarray, head: HeadConfig,
               val: EmbeddingSet, test: EmbeddingSet | None) -> dict:
    start = time.perf_counter()
    part = train.subset(rows)
    module = train_head(part, head).module
    val_scores = predict_proba(module, val.features)[:, 1]
    threshold = best_f1_threshold(val_scores, val.labels)
    row = {"regime": name, "n_positives": int(part.labels.sum()), "n_negatives": int((part.labels == 0).sum()),
           "fraction": len(rows) / len(train), "threshold": threshold,
           **{f"val_{k}": v for k, v in binary_metrics(val_scores, val.labels, threshold).items()}}
    if test is not None and len(test):
        test_scores = predict_proba(module, test.features)[:, 1]
        row.update({f"test_{k}": v for k, v in binary_metrics(test_scores, test.labels, threshold).items()})
    if "source" in part.table.columns:
        counts = part.table.loc[part.labels == 0, "source"].value_counts().sort_index()
        row["negatives_by_source"] = " ".join(f"{k}:{v}" for k, v in counts.items())
    row["seconds"] = time.perf_counter() - start
    return row


def search_regimes(data: EmbeddingSet, head: HeadConfig, grid: RegimeGrid) -> pd.DataFrame:
    """One row per regime and baseline; the column ``chosen`` marks the regime picked on validation F1."""
    train, val = data.split("train"), data.split("val")
    test = data.split("test") if (data.table["split"] == "test").any() else None
    if len(val) == 0 or len(np.unique(val.labels)) < 2:
        raise InputError("patch table: the val split needs positives and negatives to choose a regime")
    if len(data.classes) != 2:
        raise InputError(f"regime search is binary; the patch table has {len(data.classes)} classes")
    scores = negative_scores(train, head, grid.folds, grid.seed)
    rng = np.random.default_rng(grid.seed)
    # Percentages past 100 select nothing more: drop grid points that would repeat another.
    regimes = list(dict.fromkeys((min(h, 100.0), min(r, 100.0 - min(h, 100.0))) for h in grid.hard
                                 for r in grid.random if h + r > 0))
    rows = [fit_regime(f"hard{h:g}+random{r:g}", train, regime_rows(train.labels, scores, h, r, rng), head, val, test)
            | {"hard_pct": h, "random_pct": r, "kind": "regime"}
            for h, r in tqdm(regimes, desc="regimes", unit="regime")]
    table = pd.DataFrame(rows)
    table["chosen"] = False
    best = table.sort_values(["val_f1", "fraction"], ascending=[False, True], kind="stable").index[0]
    table.loc[best, "chosen"] = True
    n_neg = int(table.loc[best, "n_negatives"])
    all_neg_pct = 100.0 * n_neg / max(1, int((train.labels == 0).sum()))
    baselines = [
        fit_regime("all negatives", train, np.arange(len(train)), head, val, test)
        | {"hard_pct": 0.0, "random_pct": 100.0, "kind": "baseline"},
        fit_regime("random negatives (same size)", train,
                   regime_rows(train.labels, scores, 0.0, all_neg_pct, np.random.default_rng(grid.seed + 1)),
                   head, val, test) | {"hard_pct": 0.0, "random_pct": all_neg_pct, "kind": "baseline"},
    ]
    table = pd.concat([table, pd.DataFrame(baselines).assign(chosen=False)], ignore_index=True)
    front = ["regime", "kind", "chosen", "hard_pct", "random_pct", "fraction", "n_positives", "n_negatives"]
    return table[front + [c for c in table.columns if c not in front]]


def format_table(table: pd.DataFrame) -> str:
    shown = [c for c in ("regime", "chosen", "fraction", "n_negatives", "val_f1", "val_auroc", "test_f1",
                         "test_auroc", "seconds") if c in table.columns]
    return table[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}")


def write_results(out_dir: str | Path, table: pd.DataFrame, settings: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "regimes.csv") as tmp:
        table.to_csv(tmp, index=False)
    import json

    with atomic_path(out_dir / "regimes.json") as tmp:
        chosen = table[table["chosen"]].iloc[0].to_dict()
        tmp.write_text(json.dumps({"chosen": chosen, "settings": settings}, indent=2, default=str))
    return out_dir / "regimes.csv"


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
    chosen = table[table["chosen"]].iloc[0]
    print(f"chosen: {chosen['regime']} using {100 * chosen['fraction']:.1f}% of the training patches; wrote {path}")
