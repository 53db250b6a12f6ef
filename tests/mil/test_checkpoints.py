"""Run directories, checkpoints and command-line errors of ``mil fit|test|predict`` (issue 9, cases 4, 5, 7, 9).

One real 4-epoch fit on tiny bags is shared; every test that changes a run works on a copy of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from fixtures import synthetic_bags

from mil.__main__ import main
from mil.training import cli
from mil.training.module import MILModule

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "demo" / "mil_abmil.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1", "--data.num_workers=0"]
EPOCHS = 4


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    return synthetic_bags(tmp_path_factory.mktemp("bags"), n_slides=16, n_patches=30, dim=8, tumor_fraction=0.3)


def data_args(cohort: tuple[Path, Path]) -> list[str]:
    return ["--data.features", str(cohort[0]), "--data.labels", str(cohort[1])]


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory) -> Path:
    """val AUC saturates in the first epochs, so the best epoch comes before the last one."""
    root = tmp_path_factory.mktemp("runs") / "abmil"
    cli.fit(["--config", str(CONFIG), *data_args(cohort), "--trainer.default_root_dir", str(root),
             f"--trainer.max_epochs={EPOCHS}", "--model.lr=2e-2", "--data.batch_size=2", *QUIET])
    return root


def epoch_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def best_of(run: Path) -> Path:
    return Path(json.loads((run / "fit_summary.json").read_text())["best_checkpoint"])


def scores(checkpoint: Path, features: Path, slide_ids: list[str]) -> np.ndarray:
    """Tumor probabilities of whole bags under ``checkpoint``, computed without the CLI."""
    model = MILModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    out = []
    with torch.no_grad():
        for slide_id in slide_ids:
            with h5py.File(features / f"{slide_id}.h5") as h5:
                x = torch.from_numpy(h5["features"][:].astype(np.float32))[None]
            out.append(float(1 - model.probabilities(model(x, torch.ones(x.shape[:2], dtype=torch.bool)).logits)[0, 0]))
    return np.array(out)


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith(("error", "Traceback"))]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_last_checkpoint_is_the_last_finished_epoch(run):
    """Case 5: last.ckpt used to be the last *improvement* (epoch 0 when val AUC saturated at once)."""
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert [n for n in checkpoints if n.startswith("last")] == ["last.ckpt"], checkpoints
    assert epoch_of(run / "checkpoints" / "last.ckpt") == EPOCHS - 1
    assert epoch_of(best_of(run)) < EPOCHS - 1  # so the next tests can tell best from last
    assert json.loads((run / "fit_summary.json").read_text())["epochs"] == EPOCHS


def test_checkpoint_and_logs_carry_the_hyperparameters(run):
    """Case 5: ``load_from_checkpoint(path)`` needs no YAML, and the CSV log records the settings."""
    model = MILModule.load_from_checkpoint(best_of(run), map_location="cpu", weights_only=True)
    assert type(model.aggregator).__name__ == "ABMIL" and model.aggregator.in_dim == 8 and model.lr == 2e-2
    state = torch.load(best_of(run), map_location="cpu", weights_only=True)
    assert state["datamodule_hyper_parameters"]["batch_size"] == 2
    logged = yaml.safe_load(next(run.glob("csv/version_*/hparams.yaml")).read_text())
    assert logged["lr"] == 2e-2 and logged["aggregator"]["class_path"] == "mil.aggregators.ABMIL"


def test_saved_config_reruns_into_a_new_root_and_a_finished_fit_continues(run, tmp_path, capsys):
    """Case 5: config.yaml held the old run's absolute checkpoint.dirpath, so a rerun wrote into the old run; a
    finished fit could not be continued with more epochs."""
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["checkpoint"]["dirpath"] is None and saved["ckpt_path"] is None
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    new = tmp_path / "again"
    config = ["--config", str(run / "config.yaml"), "--trainer.default_root_dir", str(new), "--trainer.logger=false",
              *QUIET]
    cli.fit([*config, "--trainer.max_epochs=1"])
    assert (new / "checkpoints" / "last.ckpt").is_file() and (new / "fit_summary.json").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    cli.fit(config)
    assert "already finished" in capsys.readouterr().out
    cli.fit([*config, "--ckpt_path", "last", "--trainer.max_epochs=2"])
    assert epoch_of(new / "checkpoints" / "last.ckpt") == 1
    assert json.loads((new / "fit_summary.json").read_text())["epochs"] == 2
    assert main(["fit", *config, "--ckpt_path", "last", "--trainer.max_epochs=2"]) == 2
    assert "--trainer.max_epochs" in one_error_line(capsys)


def test_test_and_predict_load_the_best_checkpoint_not_the_last(run, cohort, tmp_path):
    """Case 9 guard, and the SPEC's `mil predict --config <run>/config.yaml ... --trainer.default_root_dir D`."""
    folder, labels = cohort
    val = pd.read_csv(labels).query("split == 'val'")["slide_id"].tolist()
    best, last = scores(best_of(run), folder, val), scores(run / "checkpoints" / "last.ckpt", folder, val)
    assert np.abs(best - last).max() > 1e-4
    out = tmp_path / "predicted"
    cli.predict(["--config", str(run / "config.yaml"), "--data.predict_split", "val",
                 "--trainer.default_root_dir", str(out), *QUIET])
    table = pd.read_csv(out / "predictions_val.csv").set_index("slide_id").loc[val]
    np.testing.assert_allclose(table["score"], best, atol=1e-5)
    assert (out / "patch_scores").is_dir() and not (out / "checkpoints").exists()


def test_a_rerun_with_other_settings_is_refused(run, capsys):
    assert main(["fit", "--config", str(run / "config.yaml"), "--model.lr=0.5", *QUIET]) == 2
    line = one_error_line(capsys)
    assert str(run / "config.yaml") in line and "model.lr=0.02" in line


def test_a_killed_fit_resumes_from_its_last_epoch(cohort, tmp_path, capsys):
    """Case 5: kill -9 during fit, rerun: it resumes from last.ckpt, and no stale last.ckpt sits beside last-v1.ckpt."""
    root = tmp_path / "killed"
    command = ["--config", str(CONFIG), *data_args(cohort), *QUIET, "--trainer.default_root_dir", str(root),
               "--trainer.logger=false", "--early_stopping.patience=1000"]
    pid = os.fork()  # a child of this (already imported) process is cheaper than a new interpreter
    if pid == 0:
        try:
            cli.fit([*command, "--trainer.max_epochs=500"])
        finally:
            os._exit(0)
    last = root / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.is_file() and time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert last.is_file() and not (root / "fit_summary.json").exists()
    killed_at = epoch_of(last)
    capsys.readouterr()
    cli.fit([*command, f"--trainer.max_epochs={killed_at + 3}"])
    assert "resuming the unfinished fit" in capsys.readouterr().out
    assert sorted(p.name for p in root.glob("checkpoints/last*")) == ["last.ckpt"]
    assert epoch_of(last) == killed_at + 2
    assert json.loads((root / "fit_summary.json").read_text())["epochs"] == killed_at + 3


def test_max_epochs_zero_is_refused(cohort, tmp_path, capsys):
    assert main(["fit", "--config", str(CONFIG), *data_args(cohort), "--trainer.default_root_dir",
                 str(tmp_path / "zero"), "--trainer.max_epochs", "0", *QUIET]) == 2
    assert "--trainer.max_epochs 0" in one_error_line(capsys)
    assert not (tmp_path / "zero" / "fit_summary.json").exists()


def test_bad_checkpoints_are_one_line(run, tmp_path, capsys):
    """Case 7: a missing, garbage or pickled --ckpt_path was a traceback with exit 1."""
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "x": argparse.Namespace(a=1)}, pickled)
    for path, expected in ((tmp_path / "missing.ckpt", "no such file"), (garbage, "not a PyTorch checkpoint"),
                           (pickled, "weights_only=True")):
        for command in ("test", "fit"):
            code = main([command, "--config", str(run / "config.yaml"), "--trainer.default_root_dir",
                         str(tmp_path / command), "--ckpt_path", str(path), *QUIET])
            line = one_error_line(capsys)
            assert code == 2 and str(path) in line and expected in line, line


def test_config_mistakes_are_one_line(run, cohort, tmp_path, capsys):
    """Case 7: a YAML syntax error names the file and line; a config error names the key, not 90 lines of usage."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  lr: 0.1\n  aggregator: [unclosed\ndata:\n  batch_size: 2\n")
    assert main(["fit", "--config", str(broken), *data_args(cohort)]) == 2
    line = one_error_line(capsys)
    assert str(broken) in line and "line 4" in line
    for mistake, key in ((["--model.lrr", "3"], "--model.lrr"), (["--model.lr", "abc"], "model.lr")):
        assert main(["fit", "--config", str(CONFIG), *data_args(cohort), *mistake]) == 2
        captured = capsys.readouterr()
        assert len(captured.err.strip().splitlines()) == 1 and key in captured.err and "--help" in captured.err


def test_out_that_is_a_file_is_one_line(run, tmp_path, capsys):
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    assert main(["evaluate", "--run", str(run), "--out", str(existing)]) == 2
    assert str(existing) in one_error_line(capsys) and existing.read_text() == "keep me"


def test_non_finite_features_stop_fit_and_predict_in_one_line(run, cohort, tmp_path, capsys):
    """Case 4: NaN features trained to a 'best' checkpoint with AUC 0; predict exited 0 with empty scores."""
    folder, labels = cohort
    bad = tmp_path / "features"
    shutil.copytree(folder, bad)
    train = pd.read_csv(labels).query("split == 'train'")["slide_id"].iloc[1]
    with h5py.File(bad / f"{train}.h5", "r+") as h5:
        features = h5["features"][:]
        features[11, 3] = np.nan
        h5["features"][...] = features
    root = tmp_path / "nan"
    assert main(["fit", "--config", str(CONFIG), "--data.features", str(bad), "--data.labels", str(labels),
                 "--trainer.default_root_dir", str(root), "--trainer.max_epochs=2", *QUIET]) == 2
    line = one_error_line(capsys)
    assert f"{bad / train}.h5: features row 11 " in line
    assert not list(root.glob("checkpoints/*.ckpt")) and not (root / "fit_summary.json").exists()
    assert main(["predict", "--config", str(run / "config.yaml"), "--data.features", str(bad),
                 "--data.predict_split", "train", "--trainer.default_root_dir", str(tmp_path / "p"), *QUIET]) == 2
    assert f"{bad / train}.h5: features row 11 " in one_error_line(capsys)


def remake(folder: Path, encoder: str) -> None:
    """Mark every bag of ``folder`` as made by ``encoder``: same shapes and values, another make."""
    for path in folder.glob("*.h5"):
        with h5py.File(path, "r+") as h5:
            h5["features"].attrs["encoder"] = encoder


def test_a_model_is_not_applied_to_features_of_another_make(run, cohort, tmp_path, capsys):
    """Checkpoints carry the settings of the features they were trained on: test/predict on bags of another encoder
    of the same width (or a folder re-extracted in place) ran without a word and scored nonsense."""
    state = torch.load(best_of(run), map_location="cpu", weights_only=True)
    assert state["MILDataModule"]["feature_settings"]["encoder.name"] == "synthetic"
    other = tmp_path / "other"
    shutil.copytree(cohort[0], other)
    remake(other, "another_encoder")
    for command in ("test", "predict"):
        assert main([command, "--config", str(run / "config.yaml"), "--data.features", str(other),
                     "--trainer.default_root_dir", str(tmp_path / command), *QUIET]) == 2
        line = one_error_line(capsys)
        assert str(other) in line and "'another_encoder'" in line and "'synthetic'" in line, line
        assert not (tmp_path / command / "patch_scores").exists()
    written = tmp_path / "same"
    assert main(["predict", "--config", str(run / "config.yaml"), "--trainer.default_root_dir", str(written),
                 *QUIET]) == 0
    with h5py.File(next((written / "patch_scores").glob("*.h5"))) as h5:
        assert json.loads(h5.attrs["feature_settings"])["encoder.name"] == "synthetic"


def test_a_fit_whose_features_were_remade_in_place_is_neither_skipped_nor_resumed(cohort, tmp_path, capsys):
    """A finished fit was skipped as done, and an unfinished one resumed, after its feature folder was re-extracted
    with another encoder under the same path."""
    features = tmp_path / "features"
    shutil.copytree(cohort[0], features)
    root = tmp_path / "run"
    command = ["fit", "--config", str(CONFIG), "--data.features", str(features), "--data.labels", str(cohort[1]),
               "--trainer.default_root_dir", str(root), "--trainer.logger=false", "--trainer.max_epochs=1", *QUIET]
    assert main(command) == 0
    remake(features, "another_encoder")
    assert main(command) == 2
    line = one_error_line(capsys)
    assert str(features) in line and "another_encoder" in line and "finished fit" in line, line
    (root / "fit_summary.json").unlink()  # as if the fit had been killed after its first epoch
    assert main([*command[:-len(QUIET) - 1], "--trainer.max_epochs=2", *QUIET]) == 2
    line = one_error_line(capsys)
    assert str(features) in line and "checkpoint's model was trained on" in line, line
    remake(features, "synthetic")
    assert main([*command[:-len(QUIET) - 1], "--trainer.max_epochs=2", *QUIET]) == 0
    assert epoch_of(root / "checkpoints" / "last.ckpt") == 1
