"""``make demo``: the whole pipeline on the built-in synthetic cohort, on CPU, in one command.

Every step calls the command a user would type (shown as it runs), so the demo doubles as a worked example:
synth -> extract -> fit -> mine -> fine-tune -> re-extract -> refit (``mil hnm``), then other aggregators on the
round-0 features for comparison, heatmaps, and two results tables. Rerunning resumes: finished steps are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from features.errors import InputError, run_command  # noqa: E402
from features.quiet import quiet_terminal  # noqa: E402

sys.argv[1:] = quiet_terminal(sys.argv[1:])  # the same quiet terminal as every command (--verbose shows chatter)

import pandas as pd  # noqa: E402

from features.synth.cli import main as synth  # noqa: E402
from mil.evaluation.cli import main as evaluate  # noqa: E402
from mil.evaluation.heatmap import main as heatmap  # noqa: E402
from mil.mining.layout import RoundPaths  # noqa: E402
from mil.mining.loop import main as hnm  # noqa: E402
from mil.training.cli import fit, test, tied_epoch_warnings_held, tied_fits_warning  # noqa: E402

# Aggregators compared on the frozen round-0 features: (label, config, extra options).
CPU_TRAINER = ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "30", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--early_stopping.patience", "30", "--seed_everything", "0"]
MODELS = [
    ("ABMIL + ranking loss", "configs/demo/mil_abmil_ranking.yaml", ["--model.lr", "5e-3"]),
    ("ABMIL (bag loss only)", "configs/demo/mil_abmil.yaml", ["--model.lr", "5e-3"]),
    ("DSMIL", "configs/mil/dsmil.yaml", ["--model.lr", "5e-3", "--data.num_workers", "0"]),
]


def step(command: str, function: Callable[[list[str]], None], argv: list[str]) -> None:
    print(f"\n$ {command} {' '.join(argv)}", flush=True)
    function(argv)


def compare_models(out: Path, cohort: Path, features: Path) -> pd.DataFrame:
    rows, runs = [], []
    with tied_epoch_warnings_held():  # one line for the three fits, below, as `mil hnm` does for its own
        for label, config, extra in MODELS:
            run = out / "models" / config.split("/")[-1].removesuffix(".yaml")
            runs.append(run)
            data = ["--data.features", str(features), "--data.labels", str(cohort / "labels.csv")]
            step("mil fit", fit, ["--config", config, *data, *CPU_TRAINER, *extra,
                                  "--trainer.default_root_dir", str(run)])
            if not any((run / "patch_scores").glob("*.h5")):
                step("mil test", test, ["--config", str(run / "config.yaml")])
            step("mil evaluate", evaluate, ["--run", str(run), "--annotations", str(cohort / "annotations"),
                                            "--features", str(features), "--n_bootstrap", "500"])
            rows.append({"model": label, **headline(run / "metrics.json")})
    tied = tied_fits_warning(runs, "the table below reports those first tied epochs (docs/mil.md, "
                                   "\"Checkpoints and resuming\")")
    if tied:
        print(f"warning: {tied}", flush=True)
    return pd.DataFrame(rows)


def headline(metrics_file: Path) -> dict[str, object]:
    metrics = json.loads(metrics_file.read_text())
    auc = metrics["slide"]["metrics"]["auc"]
    patch = metrics.get("patch", {})
    return {
        "slide AUC (test) [95% CI]": f"{auc['value']:.3f} [{auc['ci_low']:.2f}, {auc['ci_high']:.2f}]",
        "patch AUC": round(patch.get("pooled_auc") or float("nan"), 3),
        "tumor vs look-alike AUC": round(patch.get("tumor_vs_lookalike_auc") or float("nan"), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--n_slides", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    cohort, loop = args.out / "cohort", args.out / "hnm"

    step("features synth", synth, ["--preset", "demo", "--n_slides", str(args.n_slides), "--out", str(cohort)])
    step("mil hnm", hnm, ["--config", "configs/demo/hnm.yaml", "--rounds", str(args.rounds), "--out", str(loop),
                          "--cohort.slides", str(cohort / "slides.csv"), "--cohort.labels", str(cohort / "labels.csv"),
                          "--cohort.annotations", str(cohort / "annotations")])
    round0 = next((loop / "round_0" / "features" / "features").iterdir())
    models = compare_models(args.out, cohort, round0)
    last = loop / f"round_{args.rounds}"
    last_features = next((last / "features" / "features").iterdir())
    step("mil heatmap", heatmap, ["--run", str(RoundPaths(last).reported), "--slides", str(cohort / "slides.csv"),
                                  "--features", str(last_features), "--annotations", str(cohort / "annotations"),
                                  "--out", str(args.out / "heatmaps")])

    summary = pd.read_csv(loop / "hnm_summary.csv")
    columns = ["round", "val_slide_auc", "test_slide_auc", "test_slide_auc_low", "test_slide_auc_high",
               "test_patch_auc", "test_tumor_vs_lookalike_auc", "n_positive", "n_hard_negative",
               "positive_precision", "hard_negative_lookalike", "random_negative_lookalike", "lookalike_enrichment"]
    seconds = [c for c in summary.columns if c.startswith("seconds_")]
    print("\n== Hard-negative mining, per refresh (round 0 = frozen encoder; selection quality vs annotations)")
    print(summary[columns].to_markdown(index=False, floatfmt=".3f"))
    print("\n== Wall time per stage (s)")
    print(summary[["round", *seconds]].to_markdown(index=False, floatfmt=".1f"))
    print("\n== Aggregators on the frozen round-0 features (test split)")
    print(models.to_markdown(index=False))
    print(f"\nheatmaps: {args.out / 'heatmaps'}   total {time.perf_counter() - started:.0f} s")
    return 0


def demo() -> int:
    """``main`` with the commands' one-line errors; a folder left by an older demo gets the make-level fix."""

    def body() -> None:
        try:
            main()
        except InputError as error:
            raise InputError(f"{error} (make demo: `make clean` removes its folder, or run `make demo OUT=<new folder>`)"
                             ) from error

    return run_command(body)


if __name__ == "__main__":
    sys.exit(demo())
