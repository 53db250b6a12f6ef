"""The loop benchmark's verdict per cohort: the refresh bar that docs/benchmarks.md reports."""

from __future__ import annotations

import pandas as pd

from benchmarks.bench_loop import summarise


def summary(seed: int, before: tuple[float, float, float], after: tuple[float, float, float]) -> pd.DataFrame:
    """Two hnm_summary.csv rows for one cohort seed: (slide, patch, tumor vs look-alike AUC) per round."""
    rows = [{"seed": seed, "round": r, "val_slide_auc": 1.0, "test_slide_auc": slide, "test_patch_auc": patch,
             "test_tumor_vs_lookalike_auc": lookalike, "n_positive": 10, "positive_precision": 0.5,
             "lookalike_enrichment": 2.0, "chosen_on_val": r == 0}
            for r, (slide, patch, lookalike) in enumerate((before, after))]
    return pd.DataFrame(rows)


def test_the_bar_needs_look_alike_auc_up_and_neither_patch_nor_slide_auc_down() -> None:
    per_seed = pd.concat([
        summary(0, (1.0, 0.9, 0.7), (1.0, 0.95, 0.8)),       # met
        summary(1, (1.0, 0.9, 0.7), (0.75, 0.95, 0.8)),      # slide AUC down
        summary(2, (1.0, 0.9, 0.7), (1.0, 0.85, 0.8)),       # patch AUC down
        summary(3, (1.0, 0.9, 0.7), (1.0, 0.95, 0.7)),       # look-alike AUC not up
        summary(4, (1.0, 0.9, 0.7), (1.0, 0.89996, 0.8)),    # equal at 3 decimals: not down
    ], ignore_index=True)
    rows = summarise(per_seed)
    verdicts = {row["seed"]: row["met_bar"] for row in rows if row["round"] == 1}
    assert verdicts == {0: True, 1: False, 2: False, 3: False, 4: True}
    assert all(row["met_bar"] == "" for row in rows if row["round"] == 0)
    change = next(row for row in rows if row["round"] == "change")
    assert change["met_bar"] == "2 of 5"
    assert change["test_slide_auc"] == "-0.050 ± 0.100" and change["n_positive"] == ""
