"""Cross-validation summary from real metrics.json files, and resuming finished runs without training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from eval_inputs import noisy_predictions, write_predictions
from sklearn.metrics import roc_auc_score

from mil.__main__ import main as mil_main
from mil.evaluation.cv import run_name, summarize_runs, summary_markdown
from mil.evaluation.report import write_run_metrics

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "mil_abmil.yaml"


def fabricate_runs(root, folds=(0, 1, 2), seeds=(0,)):
    """Run folders whose metrics.json come from write_run_metrics on fabricated predictions."""
    runs, aucs = [], []
    for fold in folds:
        for seed in seeds:
            run = root / run_name(fold, seed)
            write_predictions(run / "predictions_val.csv", *noisy_predictions(16, 2.0, seed=100 + fold), "val")
            labels, scores = noisy_predictions(20, 1.0 + fold, seed=10 * fold + seed)
            write_predictions(run / "predictions_test.csv", labels, scores, "test")
            write_run_metrics(run, n_resamples=50, seed=seed)
            runs.append(run)
            aucs.append(roc_auc_score(labels, scores))
    return runs, aucs


def test_summary_is_mean_and_sample_std_over_runs(tmp_path):
    runs, aucs = fabricate_runs(tmp_path)
    summary = summarize_runs(runs)
    assert summary.loc["slide/auc", "mean"] == pytest.approx(np.mean(aucs))
    assert summary.loc["slide/auc", "std"] == pytest.approx(np.std(aucs, ddof=1))
    assert summary.loc["slide/auc", "n_runs"] == 3
    assert "slide/youden_val/balanced_accuracy" in summary.index
    assert "threshold/youden_val" in summary.index
    text = summary_markdown(summary)
    assert f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}" in text


def test_cv_command_resumes_finished_runs(tmp_path, capsys):
    out = tmp_path / "cv"
    fabricate_runs(out, folds=(0, 1), seeds=(0, 1))
    config = tmp_path / "fit.yaml"
    config.write_text("trainer:\n  max_epochs: 1\n")
    code = mil_main(["cv", "--fit_config", str(config), "--out", str(out), "--n_folds", "2", "--seeds", "[0,1]"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 4
    table = pd.read_csv(out / "cv_summary.csv", index_col="metric")
    assert table.loc["slide/auc", "n_runs"] == 4
    assert len(pd.read_csv(out / "cv_runs.csv")) == 4


def test_cv_command_bad_input(tmp_path, capsys):
    assert mil_main(["cv", "--fit_config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path), "--n_folds", "2"]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert mil_main(["cv", "--fit_config", str(tmp_path / "x.yaml"), "--out", str(tmp_path)]) == 2


def test_cv_trains_a_real_fold_then_resumes(tmp_path, capsys):
    from fixtures import synthetic_bags

    features, labels = synthetic_bags(tmp_path / "data", n_slides=8, n_patches=8, dim=8)
    table = pd.read_csv(labels).drop(columns="split")
    table["fold_0"] = ["train", "train", "train", "train", "val", "val", "test", "test"]
    table.to_csv(labels, index=False)
    argv = ["cv", "--fit_config", str(DEMO_CONFIG), "--out", str(tmp_path / "cv"), "--folds", "[0]",
            "--", "--data.features", str(features), "--data.labels", str(labels), "--trainer.max_epochs", "3",
            "--trainer.logger", "false"]
    assert mil_main(argv) == 0
    run = tmp_path / "cv" / run_name(0, 0)
    # Two validation slides: AUC reads 1.0 at every epoch, so validation did not choose the epoch kept; the fold's
    # own line is held and the summary ends with the one line for all folds.
    assert json.loads((run / "fit_summary.json").read_text())["epochs_tied_with_best"] == [0, 1, 2]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 1 of 1 slide-model fits kept the first")
    saved, config = (yaml.safe_load(path.read_text()) for path in (run / "config.yaml", DEMO_CONFIG))
    assert saved["trainer"]["max_epochs"] == 3 and saved["data"]["features"] == str(features)  # given after --
    assert saved["data"]["fold"] == 0 and saved["seed_everything"] == 0  # set by mil cv
    assert saved["model"]["lr"] == config["model"]["lr"]  # from the config
    slide = json.loads((run / "metrics.json").read_text())["slide"]
    assert slide["evaluated_split"] == "test" and slide["n_slides"] == 2
    assert pd.read_csv(tmp_path / "cv" / "cv_summary.csv", index_col="metric").loc["slide/auc", "n_runs"] == 1
    assert mil_main(argv) == 0
    resumed = capsys.readouterr().out
    assert "fold_0_seed_0: finished earlier, skipped" in resumed
    assert resumed.count("warning:") == 1 and "warning: 1 of 1 slide-model fits" in resumed  # read from the summary


def test_a_misspelt_fit_option_stops_cv_before_any_fold_trains(tmp_path, capsys):
    argv = ["cv", "--fit_config", str(DEMO_CONFIG), "--out", str(tmp_path / "cv"), "--n_folds", "2",
            "--", "--data.features", "f", "--data.labels", "l", "--trainer.max_epochz", "1"]
    assert mil_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "--trainer.max_epochz" in error and "\n" not in error
    assert not (tmp_path / "cv" / run_name(0, 0)).exists()
