"""The cost claim of hard-negative mining: fine-tuning on the mined selection vs on all normal-slide patches.

One round 0 (extract with the starting encoder, train the slide model, score training patches) is shared. Then,
for two ``neg_ratio`` values and for ``neg_ratio = 1`` (every normal-slide patch: fine-tuning on all patches),
the same encoder is fine-tuned for the same number of epochs, features are re-extracted and the slide model is
retrained. Reported side by side: patches and seconds per fine-tuning epoch, and the downstream slide AUC
(validation, test) and patch AUC (test). ``python benchmarks/bench_finetune.py [OUT]`` runs it on the
synthetic demo cohort on CPU (written if missing); ``run(out_dir)`` returns the rows for ``make bench``.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "hnm.yaml"
NEG_RATIOS = (0.05, 0.2, 1.0)  # 1.0 = all normal-slide patches: the baseline without mining
EPOCHS = 2  # both phases once; every variant runs whole epochs (no step cap) so epoch cost is comparable


def load_args(config: Path, out: Path, cohort: Path):
    from features.options import from_values
    from mil.mining.settings import HNMArgs

    values = yaml.safe_load(config.read_text())
    values["cohort"] = {"slides": str(cohort / "slides"), "labels": str(cohort / "labels.csv"),
                        "annotations": str(cohort / "annotations")}
    values["out"] = str(out)
    values.setdefault("finetune_options", {}).setdefault("trainer", {}).update(
        {"max_epochs": EPOCHS, "limit_train_batches": 1.0})
    return from_values(HNMArgs, values, str(config), "mil hnm")


def ensure_cohort(folder: Path) -> Path:
    if not (folder / "labels.csv").is_file():
        from features.synth.cohort import config_from, write_cohort

        write_cohort(folder, config_from("demo"), num_workers=2)
    return folder


def run(out_dir: Path, cohort: Path | None = None, neg_ratios: tuple[float, ...] = NEG_RATIOS) -> list[dict]:
    from mil.mining.loop import run_round as run_planned
    from mil.mining.settings import plan_round, round_paths

    def run_round(args, index: int) -> dict:
        return run_planned(args, plan_round(args, index))

    out_dir = Path(out_dir)
    cohort = ensure_cohort(Path(cohort) if cohort else out_dir / "cohort")
    base = load_args(CONFIG, out_dir / "base", cohort)
    run_round(base, 0)  # shared: extraction, slide model and training patch scores with the starting encoder
    rows = []
    for ratio in neg_ratios:
        args = replace(base, out=str(out_dir / f"neg_ratio_{ratio:g}"), mining=replace(base.mining, neg_ratio=ratio))
        first = round_paths(Path(args.out), 0).root
        if not first.exists():
            shutil.copytree(round_paths(Path(base.out), 0).root, first, symlinks=True,
                            ignore=shutil.ignore_patterns("selection.csv", ".mine.done", "selection_quality.json"))
        run_round(args, 0)  # re-mines with this ratio; every other stage is reused
        row = run_round(args, 1)
        sidecar = json.loads((round_paths(Path(args.out), 1).encoder.with_name("encoder.safetensors.json")).read_text())
        rows.append({
            "variant": "all normal patches" if ratio >= 1 else f"mined, neg_ratio={ratio:g}",
            "hard_negatives": sidecar["selection_counts"]["hard_negative"],
            "positives": sidecar["selection_counts"]["positive"],
            "steps": sidecar["steps"], "epochs": sidecar["epochs"],
            "finetune_s": sidecar["seconds"], "s_per_epoch": round(sidecar["seconds"] / max(1, sidecar["epochs"]), 1),
            "val_slide_auc": row["val_slide_auc"], "test_slide_auc": row["test_slide_auc"],
            "test_patch_auc": row["test_patch_auc"], "lookalike_enrichment": row["lookalike_enrichment"],
        })
    base_row = run_round(base, 0)
    rows.append({"variant": "round 0 (frozen starting encoder)", "val_slide_auc": base_row["val_slide_auc"],
                 "test_slide_auc": base_row["test_slide_auc"], "test_patch_auc": base_row["test_patch_auc"]})
    return rows


if __name__ == "__main__":
    import pandas as pd

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/bench/finetune")
    print(pd.DataFrame(run(target)).to_markdown(index=False))
