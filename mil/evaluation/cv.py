"""``mil cv``: train every fold (and seed) of a config, then report each test metric as mean ± std.

Each run lives in ``<out>/fold_<k>_seed_<s>``; a run whose ``metrics.json`` already holds slide metrics is not
trained again, so an interrupted cross-validation resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jsonargparse import ActionConfigFile, ArgumentParser

from features.errors import InputError
from features.store import atomic_path
from mil.evaluation.report import METRICS_NAME
from mil.training.command import MILCommand, dotted

SUMMARY_NAME, RUNS_NAME = "cv_summary.csv", "cv_runs.csv"


def run_name(fold: int, seed: int) -> str:
    return f"fold_{fold}_seed_{seed}"


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics of a metrics.json as ``slide/<name>`` (point values) and ``patch/<name>``."""
    flat: dict[str, float] = {}
    for name, interval in metrics.get("slide", {}).get("metrics", {}).items():
        flat[f"slide/{name}"] = np.nan if interval.get("value") is None else float(interval["value"])
    for name, value in metrics.get("patch", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.startswith("n_"):
            flat[f"patch/{name}"] = float(value)
    return flat


def collect_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run: its directory, evaluated split, thresholds and flattened metrics."""
    rows = []
    for run_dir in run_dirs:
        path = Path(run_dir) / METRICS_NAME
        if not path.is_file():
            raise InputError(f"{path}: missing; the run did not finish (rerun `mil cv` to resume it)")
        metrics = json.loads(path.read_text())
        slide = metrics.get("slide", {})
        row: dict[str, Any] = {"run": Path(run_dir).name, "evaluated_split": slide.get("evaluated_split"),
                               "n_slides": slide.get("n_slides")}
        row.update({f"threshold/{k}": v for k, v in slide.get("thresholds", {}).items()})
        row.update(flatten_metrics(metrics))
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Mean, sample std, min, max and count over runs of every metric (index: metric name)."""
    runs = collect_runs(run_dirs)
    if runs.empty:
        raise InputError("no runs to summarise")
    splits = set(runs["evaluated_split"].dropna())
    columns = [c for c in runs.columns if c.startswith(("slide/", "patch/", "threshold/"))]
    values = runs[columns].apply(pd.to_numeric, errors="coerce")
    summary = pd.DataFrame({"mean": values.mean(), "std": values.std(ddof=1), "min": values.min(),
                            "max": values.max(), "n_runs": values.count()})
    summary.index.name = "metric"
    summary.attrs["evaluated_split"] = ",".join(sorted(splits))
    return summary


def summary_markdown(summary: pd.DataFrame) -> str:
    lines = [f"cross-validation over {int(summary['n_runs'].max())} run(s), metrics on "
             f"{summary.attrs.get('evaluated_split', '?')} (mean ± sample std)", "",
             "| metric | mean ± std | min | max | runs |", "|---|---|---|---|---|"]
    for metric, row in summary.iterrows():
        std = "n/a" if np.isnan(row["std"]) else f"{row['std']:.3f}"
        lines.append(f"| {metric} | {row['mean']:.3f} ± {std} | {row['min']:.3f} | {row['max']:.3f} | "
                     f"{int(row['n_runs'])} |")
    return "\n".join(lines)


def write_summary(out: str | Path, run_dirs: list[Path]) -> pd.DataFrame:
    """Write ``cv_summary.csv`` and ``cv_runs.csv`` into ``out`` and return the summary."""
    out = Path(out)
    summary = summarize_runs(run_dirs)
    with atomic_path(out / SUMMARY_NAME) as tmp:
        summary.to_csv(tmp, float_format="%.6g")
    with atomic_path(out / RUNS_NAME) as tmp:
        collect_runs(run_dirs).to_csv(tmp, index=False, float_format="%.6g")
    return summary


def is_finished(run_dir: Path) -> bool:
    path = run_dir / METRICS_NAME
    try:
        return path.is_file() and "slide" in json.loads(path.read_text())
    except json.JSONDecodeError:
        return False


def fit_command(fit_config: str, given: list[str]) -> MILCommand:
    """``fit_config`` with the ``mil fit`` options given after ``--``, read once by ``mil fit``'s own parser (so a
    bad one stops ``mil cv`` before the first fold trains); each fold's run gets these settings, not a command
    line."""
    from mil.training.cli import parsed_settings

    settings = parsed_settings("fit", ["--config", fit_config, *given])
    settings.pop("config", None)
    return MILCommand(settings=dotted(settings))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mil cv", description=__doc__ + "\nArguments after `--` go to every `mil fit`.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_argument("--fit_config", type=str, required=True, help="the `mil fit` YAML config to cross-validate")
    parser.add_argument("--out", type=str, required=True, help="folder for the runs and the summary")
    parser.add_argument("--n_folds", type=int | None, default=None, help="run folds 0..n_folds-1")
    parser.add_argument("--folds", type=list[int] | None, default=None, help="or these folds, e.g. [0,2]")
    parser.add_argument("--seeds", type=list[int], default=[0], help="seeds per fold, e.g. [0,1,2]")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(argv or [])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if (args.n_folds is None) == (args.folds is None):
        raise InputError("mil cv: pass exactly one of --n_folds N or --folds [..]")
    folds = list(range(args.n_folds)) if args.folds is None else list(args.folds)
    if not folds or not args.seeds:
        raise InputError("mil cv: no folds or seeds to run")
    if not Path(args.fit_config).is_file():
        raise InputError(f"{args.fit_config}: config not found; pass a `mil fit` YAML")
    from mil.training.cli import fit, tied_epoch_warnings_held, tied_fits_warning

    command: MILCommand | None = None  # read when a fold needs training: finished runs need no settings
    out = Path(args.out)
    run_dirs = []
    with tied_epoch_warnings_held():  # one line for all folds, below
        for fold in folds:
            for seed in args.seeds:
                run_dir = out / run_name(fold, seed)
                run_dirs.append(run_dir)
                if is_finished(run_dir):
                    print(f"{run_dir.name}: finished earlier, skipped")
                    continue
                print(f"{run_dir.name}: training")
                command = command or fit_command(args.fit_config, extra)
                fit(command.updated({"data.fold": fold, "seed_everything": seed,
                                     "trainer.default_root_dir": str(run_dir)}))
                if not is_finished(run_dir):
                    raise RuntimeError(f"{run_dir}: `mil fit` finished without writing slide metrics to {METRICS_NAME}")
    summary = write_summary(out, run_dirs)
    print(summary_markdown(summary))
    tied = tied_fits_warning(run_dirs, "more validation slides let it, or `-- --checkpoint.tie_breaker val_loss` "
                                       "keeps the lowest-loss tied epoch")
    if tied:
        print(f"warning: {tied}")
    print(f"\nwrote {out / SUMMARY_NAME} and {out / RUNS_NAME}")
