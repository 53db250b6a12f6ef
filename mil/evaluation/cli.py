"""``mil evaluate``: slide metrics with bootstrap CIs from a run (or predictions CSVs); patch metrics when
annotations are given. Results are merged into ``metrics.json`` beside the predictions."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from features.errors import InputError
from mil.evaluation.bootstrap import DEFAULT_N
from mil.evaluation.patch_truth import evaluate_patches, format_patch_table
from mil.evaluation.report import (
    METRICS_NAME, format_slide_table, merge_metrics, read_predictions_csv, run_predictions, to_predictions,
    write_slide_metrics,
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mil evaluate", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--run", type=str | None, default=None,
                        help="run directory holding predictions_val.csv / predictions_test.csv / predictions.csv")
    parser.add_argument("--predictions", type=str | None, default=None, help="predictions CSV to evaluate")
    parser.add_argument("--val_predictions", type=str | None, default=None,
                        help="validation predictions CSV, where the thresholds are chosen")
    parser.add_argument("--out", type=str | None, default=None,
                        help="folder for metrics.json and roc.png (default: the run, or the predictions' folder)")
    parser.add_argument("--annotations", type=str | None, default=None, help="folder of ASAP XML / GeoJSON files")
    parser.add_argument("--features", type=str | None, default=None, help="features folder (patch geometry)")
    parser.add_argument("--patch_size_level0", type=int | None, default=None,
                        help="patch side in level-0 pixels, for feature files without geometry (CLAM)")
    parser.add_argument("--patch_scores", type=str | None, default=None,
                        help="patch_scores folder (default: <run>/patch_scores)")
    parser.add_argument("--min_overlap", type=float, default=0.5, help="tumor overlap that makes a tumor patch")
    parser.add_argument("--top_k", type=int, default=10, help="k for top-k recall/precision per tumor slide")
    parser.add_argument("--score", type=str, default="instance",
                        help="patch score to judge: instance (tumor logit) or attention")
    parser.add_argument("--n_bootstrap", type=int, default=DEFAULT_N, help="bootstrap resamples (0: no CIs)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
