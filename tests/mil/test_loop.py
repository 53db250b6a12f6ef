"""The HNM loop on a tiny synthetic cohort: every stage runs once, finished stages are skipped on rerun, and an
interrupted stage is redone from a clean folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from features.synth.cohort import config_from, write_cohort
from mil.mining import loop

torch.set_num_threads(1)
ROUND0 = ("tile", "extract", "fit", "predict_train", "evaluate", "mine")


def loop_argv(cohort: Path, out: Path, rounds: int) -> list[str]:
    return [
        "--cohort.slides", str(cohort / "slides"), "--cohort.labels", str(cohort / "labels.csv"),
        "--cohort.annotations", str(cohort / "annotations"), "--out", str(out), "--rounds", str(rounds),
        "--encoder.name", "resnet10t",
        "--tiling_options", json.dumps({"mpp": 2.0, "patch_size": 32}),
        "--extract_options", json.dumps({"batch_size": 64, "num_workers": 0, "accelerator": "cpu"}),
        "--mil_config", "configs/demo/mil_abmil.yaml",
        "--mil_options", json.dumps({"trainer": {"max_epochs": 2, "logger": False}, "data": {"max_patches_train": 64}}),
        "--mining.neg_ratio", "0.2", "--mining.positives.start", "0.2",
        "--finetune_options", json.dumps({"data": {"batch_size": 8, "num_workers": 0},
                                          "trainer": {"accelerator": "cpu", "max_steps": 2,
                                                      "enable_progress_bar": False}}),
        "--evaluate_options", json.dumps({"n_bootstrap": 10}),
    ]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hnm") / "cohort"
    write_cohort(root, config_from("tiny", n_slides=8, width=1024, height=768), progress=False)
    return root


def test_loop_runs_resumes_and_redoes_interrupted_stages(cohort, tmp_path, capsys):
    out = tmp_path / "run"
    loop.main(loop_argv(cohort, out, rounds=0))
    first = out / "round_0"
    assert all((first / f".{stage}.done").is_file() for stage in ROUND0)
    assert (first / "selection.csv").is_file() and (first / "selection_quality.json").is_file()
    fit_marker = (first / ".fit.done").read_text()

    loop.main(loop_argv(cohort, out, rounds=1))  # round 0 is skipped, round 1 fine-tunes and refreshes
    assert (first / ".fit.done").read_text() == fit_marker
    assert "[round_0] fit: done before, skipping" in capsys.readouterr().out
    second = out / "round_1"
    assert (second / "encoder.safetensors").is_file() and (second / ".finetune.done").is_file()
    tuned = json.loads((second / "encoder.safetensors.json").read_text())
    assert tuned["selection"] == str(first / "selection.csv")
    assert list((second / "features" / "features").iterdir())[0].name == "resnet10t-round1"

    # A kill during predict_train: marker missing, a half-written folder left behind; the rerun redoes only it
    # (and the stages after it), from a clean folder.
    for stage in ("predict_train", "evaluate", "mine"):
        (second / f".{stage}.done").unlink()
    (second / "mil_train" / "junk.partial").write_text("half")
    summary_before = json.loads((second / "mil" / "fit_summary.json").read_text())
    loop.main(loop_argv(cohort, out, rounds=1))
    printed = capsys.readouterr().out
    assert "[round_1] finetune: done before, skipping" in printed and "[round_1] predict_train ..." in printed
    assert not (second / "mil_train" / "junk.partial").exists()
    assert json.loads((second / "mil" / "fit_summary.json").read_text()) == summary_before

    table = pd.read_csv(out / loop.SUMMARY_NAME)
    assert table["round"].tolist() == [0, 1]
    assert {"val_slide_auc", "test_patch_auc", "lookalike_enrichment", "seconds_finetune"} <= set(table.columns)
    assert table["chosen_on_val"].sum() == 1


def test_options_flatten_nested_settings():
    assert loop.options({"trainer": {"max_epochs": 2, "logger": False}, "model_kwargs": {"a": 1}, "x": None}) == [
        "--trainer.max_epochs", "2", "--trainer.logger", "false", "--model_kwargs", '{"a": 1}', "--x", "null"]
