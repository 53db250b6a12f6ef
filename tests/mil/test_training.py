"""Real ``mil fit|test|predict`` runs through the CLI functions on tiny synthetic bags with a planted signal."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import synthetic_bags
from sklearn.metrics import roc_auc_score

from mil.training import cli

CONFIGS = Path(__file__).parents[2] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1", "--data.num_workers=0"]
TUMOR_PATCHES = 9  # synthetic_bags plants the signal in the first int(0.3 * 30) rows of tumor slides


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    return synthetic_bags(tmp_path_factory.mktemp("bags"), n_slides=16, n_patches=30, dim=8, tumor_fraction=0.3)


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory) -> Path:
    folder, labels = cohort
    root = tmp_path_factory.mktemp("runs") / "abmil"
    cli.fit(["--config", str(CONFIGS / "demo" / "mil_abmil.yaml"), "--data.features", str(folder),
             "--data.labels", str(labels), "--trainer.default_root_dir", str(root), "--trainer.max_epochs=6",
             "--model.lr=5e-3", "--data.batch_size=2", *QUIET])
    return root


def test_fit_writes_run_directory_and_learns(run, cohort):
    assert (run / "config.yaml").is_file() and (run / "versions.json").is_file()
    recorded = json.loads((run / "versions.json").read_text())
    assert recorded["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert int(recorded["torch_threads"]) >= 1  # trained weights depend on it (docs/method.md)
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert any(p.name.startswith("best-") for p in checkpoints) and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "csv").is_dir() and (run / "wandb").is_dir()
    summary = json.loads((run / "fit_summary.json").read_text())
    assert summary["best_val_auc"] >= 0.99, summary
    labels = pd.read_csv(cohort[1])
    for split in ("val", "test"):
        table = pd.read_csv(run / f"predictions_{split}.csv")
        assert list(table.columns[:4]) == ["slide_id", "label", "score", "split"]
        assert set(table["slide_id"]) == set(labels.loc[labels["split"] == split, "slide_id"])
        assert table["split"].eq(split).all() and table["score"].between(0, 1).all()
    test = pd.read_csv(run / "predictions_test.csv")
    assert roc_auc_score(test["label"], test["score"]) >= 0.99
    assert pd.read_csv(run / "predictions.csv").equals(test)
    assert "class_path: mil.aggregators.ABMIL" in (run / "config.yaml").read_text()
    logged = pd.read_csv(next(run.glob("csv/version_*/metrics.csv")))
    losses, train_auc = logged["train_loss"].dropna(), logged["train_auc"].dropna()
    assert losses.iloc[-1] < losses.iloc[0] and train_auc.iloc[0] < 0.9 <= train_auc.iloc[-1]  # it learned


def test_fit_again_skips_a_finished_run(run, cohort, capsys):
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    cli.fit(["--config", str(run / "config.yaml")])
    assert "already finished" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_test_and_predict_write_patch_scores_aligned_with_coords(run, cohort):
    folder, labels = cohort
    cli.test(["--config", str(run / "config.yaml"), *QUIET])
    assert (run / "config_test.yaml").is_file()
    table = pd.read_csv(labels)
    tumor_gap = []
    for slide_id, label in table.loc[table["split"] == "test", ["slide_id", "label"]].itertuples(index=False):
        with h5py.File(run / "patch_scores" / f"{slide_id}.h5") as h5, h5py.File(folder / f"{slide_id}.h5") as src:
            np.testing.assert_array_equal(h5["coords"][:], src["coords"][:])
            scores = h5["scores"][:]
            assert scores.shape == (30,) and h5["attention"].shape == (30,)
        if label == "tumor":
            tumor_gap.append(scores[:TUMOR_PATCHES].mean() - scores[TUMOR_PATCHES:].mean())
    assert min(tumor_gap) > 0  # the planted patches are the most tumor-like

    cli.predict(["--config", str(run / "config.yaml"), "--data.predict_split", "train", *QUIET])
    train = pd.read_csv(run / "predictions_train.csv")
    assert set(train["slide_id"]) == set(table.loc[table["split"] == "train", "slide_id"])
    assert all((run / "patch_scores" / f"{s}.h5").is_file() for s in train["slide_id"])


def test_ranking_config_runs_with_pair_batches(cohort, tmp_path):
    folder, labels = cohort
    root = tmp_path / "ranking"
    cli.fit(["--config", str(CONFIGS / "mil" / "abmil_ranking.yaml"), "--data.features", str(folder),
             "--data.labels", str(labels), "--trainer.default_root_dir", str(root), "--trainer.max_epochs=2",
             "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
             "--model.aggregator.init_args.hidden_dim=16", "--model.aggregator.init_args.attention_dim=8",
             "--data.max_patches_train=20", *QUIET])
    metrics = pd.read_csv(next(root.glob("lightning_logs/version_*/metrics.csv")))
    assert metrics["train_ranking"].notna().any() and np.isfinite(metrics["train_loss"].dropna()).all()
    assert (root / "predictions_val.csv").is_file()


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "mil").glob("*.yaml")))
def test_every_config_parses(name, cohort, capsys):
    folder, labels = cohort
    with pytest.raises(SystemExit) as done:
        cli.fit(["--config", str(CONFIGS / "mil" / f"{name}.yaml"), "--data.features", str(folder),
                 "--data.labels", str(labels), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: mil.aggregators." in capsys.readouterr().out


def test_multiclass_fit_writes_class_probabilities(cohort, tmp_path):
    folder, labels = cohort
    frame = pd.read_csv(labels)
    frame["label"] = [i % 3 for i in range(len(frame))]
    frame.to_csv(tmp_path / "labels3.csv", index=False)
    root = tmp_path / "multi"
    cli.fit(["--config", str(CONFIGS / "mil" / "mean.yaml"), "--data.features", str(folder),
             "--data.labels", str(tmp_path / "labels3.csv"), "--trainer.default_root_dir", str(root),
             "--trainer.max_epochs=1", "--trainer.logger=false", "--model.aggregator.init_args.hidden_dim=8", *QUIET])
    table = pd.read_csv(root / "predictions_val.csv")
    probs = table[["prob_0", "prob_1", "prob_2"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(table["score"], 1 - probs[:, 0], rtol=1e-5)


def test_bad_input_through_the_mil_command_is_one_line(cohort, tmp_path, capsys):
    from mil.__main__ import main

    folder, _ = cohort
    bad = tmp_path / "labels.csv"
    bad.write_text("slide_id,label,split\nslide_000,metastasis,train\n")
    code = main(["fit", "--config", str(CONFIGS / "mil" / "abmil.yaml"), "--data.features", str(folder),
                 "--data.labels", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and str(bad) in err[-1] and "metastasis" in err[-1]


def test_two_process_test_run_writes_every_slide_once(run, cohort, tmp_path):
    """``mil test`` under DDP on 2 CPU processes: rank 0's CSV holds both ranks' slides, each once."""
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    root = Path(__file__).parents[2]
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-m", "mil", "test", "--config", str(copy / "config.yaml"), *QUIET,
         "--trainer.default_root_dir", str(copy), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.logger", "false"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = pd.read_csv(cohort[1])
    expected = set(labels.loc[labels["split"] == "test", "slide_id"])
    table = pd.read_csv(copy / "predictions_test.csv")
    assert len(expected) >= 3 and set(table["slide_id"]) == expected and table["slide_id"].is_unique
    assert all((copy / "patch_scores" / f"{s}.h5").is_file() for s in expected)



@pytest.mark.parametrize("tie_breaker", ["val_loss", "null"])
def test_best_checkpoint_can_break_validation_auc_ties_by_validation_loss(cohort, tmp_path, tie_breaker, capsys):
    """Val AUC reaches its best early and stays there. With ``--checkpoint.tie_breaker val_loss`` the kept epoch is
    the tied one with the lowest val loss; by default the first tied epoch, as Lightning's ModelCheckpoint does,
    and the fit says in one line that validation did not choose it."""
    folder, labels = cohort
    cli.fit(["--config", str(CONFIGS / "demo" / "mil_abmil.yaml"), "--data.features", str(folder),
             "--data.labels", str(labels), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs=5",
             "--model.lr=2e-2", "--data.batch_size=2", f"--checkpoint.tie_breaker={tie_breaker}",
             "--early_stopping.patience=5", *QUIET])
    logged = pd.read_csv(next(tmp_path.glob("csv/version_*/metrics.csv"))).dropna(subset=["val_auc"])
    logged = logged[logged["epoch"] < json.loads((tmp_path / "fit_summary.json").read_text())["epochs"]]
    tied = logged[logged["val_auc"] == logged["val_auc"].max()]
    assert len(tied) > 1, "the cohort must tie on val AUC for this test to mean anything"
    by_loss, first = int(tied.loc[tied["val_loss"].idxmin(), "epoch"]), int(tied["epoch"].iloc[0])
    assert by_loss != first
    best = Path(json.loads((tmp_path / "fit_summary.json").read_text())["best_checkpoint"]).name
    expected = by_loss if tie_breaker == "val_loss" else first
    assert best.startswith(f"best-epoch{expected:03d}-"), (best, tied[["epoch", "val_auc", "val_loss"]])
    summary = json.loads((tmp_path / "fit_summary.json").read_text())
    assert summary["best_epoch"] == expected and summary["epochs_tied_with_best"] == tied["epoch"].astype(int).tolist()
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    if tie_breaker == "val_loss":
        assert warnings == []
    else:
        assert len(warnings) == 1 and str(tmp_path) in warnings[0], warnings
        assert f"at {len(tied)} of {summary['epochs']} epochs" in warnings[0] and f"(epoch {first}," in warnings[0]


def test_sanity_check_on_one_class_of_validation_slides_does_not_warn(cohort, tmp_path):
    """Lightning's sanity check reads the first validation slides; when they are all normal an AUC of them is
    meaningless, so none is computed (torchmetrics would warn "No positive samples in targets")."""
    import warnings

    folder, labels = cohort
    table = pd.read_csv(labels)
    val = table[table["split"] == "val"].sort_values("label")  # the normal validation slides first
    assert (val["label"].iloc[:2] == "normal").all() and (val["label"] == "tumor").any()
    reordered = tmp_path / "labels.csv"
    pd.concat([table[table["split"] != "val"], val]).to_csv(reordered, index=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.fit(["--config", str(CONFIGS / "demo" / "mil_abmil.yaml"), "--data.features", str(folder),
                 "--data.labels", str(reordered), "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.max_epochs=1", "--data.batch_size=1", "--trainer.num_sanity_val_steps=2",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 "--data.num_workers=0"])
    assert not [w for w in caught if "No positive samples" in str(w.message)]
    assert json.loads((tmp_path / "run" / "fit_summary.json").read_text())["best_val_auc"] is not None
