"""Does one refresh of the mining loop improve on round 0? The demo loop on several synthetic cohort seeds.

For each seed: write the 40-slide ``demo`` cohort with that seed (skipped when present), run
``mil hnm --config configs/demo/hnm.yaml --rounds 1`` (resumable), and read ``hnm_summary.csv``. Rows per seed
and round, then mean ± std over seeds of round 0, round 1 and the change: a single cohort is one draw, and the
claim "better than the last round" should hold across draws. ``python benchmarks/bench_loop.py [OUT]`` runs it
alone; ``run(out_dir)`` returns the rows for ``make bench``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "hnm.yaml"
SEEDS = (0, 1, 2)
N_SLIDES = 40
METRICS = ("val_slide_auc", "test_slide_auc", "test_patch_auc", "test_tumor_vs_lookalike_auc")


def run_seed(out_dir: Path, seed: int) -> pd.DataFrame:
    from features.synth.cohort import config_from, write_cohort
    from mil.mining.loop import main as hnm

    cohort = write_cohort(out_dir / f"cohort_seed{seed}", config_from("demo", n_slides=N_SLIDES, seed=seed),
                          num_workers=2, progress=False)
    loop = out_dir / f"hnm_seed{seed}"
    hnm(["--config", str(CONFIG), "--rounds", "1", "--out", str(loop), "--cohort.slides", str(cohort.slides_csv),
         "--cohort.labels", str(cohort.labels_csv), "--cohort.annotations", str(cohort.annotations)])
    return pd.read_csv(loop / "hnm_summary.csv").assign(seed=seed)


def summarise(per_seed: pd.DataFrame) -> list[dict]:
    """Rows per seed and round, then mean ± std over seeds for round 0, round 1 and round 1 - round 0."""
    columns = ["seed", "round", *METRICS, "positive_precision", "lookalike_enrichment", "chosen_on_val"]
    rows = per_seed[columns].round(3).to_dict("records")
    by_round = {r: per_seed[per_seed["round"] == r].set_index("seed")[list(METRICS)] for r in (0, 1)}
    for label, frame in (("round 0", by_round[0]), ("round 1", by_round[1]), ("change", by_round[1] - by_round[0])):
        rows.append({"seed": f"mean ± std ({len(frame)} seeds)", "round": label,
                     **{m: f"{frame[m].mean():+.3f} ± {frame[m].std(ddof=0):.3f}" if label == "change"
                        else f"{frame[m].mean():.3f} ± {frame[m].std(ddof=0):.3f}" for m in METRICS}})
    return rows


def run(out_dir: Path, seeds: tuple[int, ...] = SEEDS) -> list[dict]:
    out_dir = Path(out_dir)
    return summarise(pd.concat([run_seed(out_dir, seed) for seed in seeds], ignore_index=True))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/bench/loop")
    print(pd.DataFrame(run(target)).to_markdown(index=False))
