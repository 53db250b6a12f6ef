"""``mil evaluate``: slide metrics with bootstrap CIs, and patch metrics when annotations are given.

It reads a run (or predictions CSVs) and merges its results into ``metrics.json`` beside the predictions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.errors import InputError
from features.options import parse
from mil.evaluation.bootstrap import DEFAULT_N
from mil.evaluation.patch_truth import evaluate_patches, format_patch_table
from mil.evaluation.report import (
    METRICS_NAME, format_slide_table, merge_metrics, read_predictions_csv, run_predictions, to_predictions,
    write_slide_metrics,
)


@dataclass
class EvaluateArgs:
    """What ``mil evaluate`` reads.

    Attributes:
        run: run directory holding predictions_val.csv / predictions_test.csv / predictions.csv.
        predictions: predictions CSV to evaluate (instead of a run).
        val_predictions: validation predictions CSV, where the thresholds are chosen.
        out: folder for metrics.json and roc.png (default: the run, or the predictions' folder).
        annotations: folder of ASAP XML / GeoJSON files: enables the patch metrics.
        features: features folder (patch geometry), needed with annotations.
        patch_size_level0: patch side in level-0 pixels, for feature files without geometry (CLAM).
        patch_scores: patch_scores folder (default: <run>/patch_scores).
        min_overlap: tumor overlap that makes a tumor patch.
        top_k: k for top-k recall/precision per tumor slide.
        score: patch score to judge: instance (tumor logit) or attention.
        n_bootstrap: bootstrap resamples (0: no CIs).
        seed: bootstrap seed.
    """

    run: str | None = None
    predictions: str | None = None
    val_predictions: str | None = None
    out: str | None = None
    annotations: str | None = None
    features: str | None = None
    patch_size_level0: int | None = None
    patch_scores: str | None = None
    min_overlap: float = 0.5
    top_k: int = 10
    score: str = "instance"
    n_bootstrap: int = DEFAULT_N
    seed: int = 0


def main(argv: list[str] | None = None) -> None:
    evaluate(parse(EvaluateArgs, argv, "mil evaluate", __doc__ or ""))


def evaluate(args: EvaluateArgs) -> None:
    """Slide metrics (and patch metrics with annotations) of a run or predictions CSVs, into metrics.json."""
    if bool(args.run) == bool(args.predictions):
        raise InputError("mil evaluate: pass exactly one of --run DIR or --predictions CSV")
    if args.run:
        run = Path(args.run)
        if not run.is_dir():
            raise InputError(f"{run}: run directory not found; pass --trainer.default_root_dir of a `mil fit` run")
        val, evaluated, split = run_predictions(run)
        if evaluated is None:
            raise InputError(f"{run}: holds no predictions CSV; run `mil test` first")
        out = Path(args.out or run)
    else:
        evaluated = to_predictions(read_predictions_csv(args.predictions), args.predictions)
        val = (to_predictions(read_predictions_csv(args.val_predictions), args.val_predictions)
               if args.val_predictions else None)
        split = "test" if val is not None else "val"
        out = Path(args.out or Path(args.predictions).parent)
    if len(evaluated) == 0:
        raise InputError(f"{evaluated.source}: no labelled slides to evaluate")
    metrics = write_slide_metrics(out, evaluated, val, split, args.n_bootstrap, args.seed)
    print(format_slide_table(metrics["slide"]))
    if args.annotations:
        scores = args.patch_scores or (args.run and str(Path(args.run) / "patch_scores"))
        if not scores or not args.features:
            raise InputError("mil evaluate: --annotations needs --features DIR and a run (or --patch_scores DIR)")
        labels = dict(zip(evaluated.slide_ids.tolist(), evaluated.labels.tolist()))
        section = evaluate_patches(scores, args.features, args.annotations, labels, args.min_overlap, args.top_k,
                                   args.score, slide_ids=set(labels),
                                   size_level0=args.patch_size_level0)
        section["split"] = split
        merge_metrics(out / METRICS_NAME, {"patch": section})
        print()
        print(format_patch_table(section))
    print(f"\nwrote {out / METRICS_NAME}")
