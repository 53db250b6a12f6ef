"""The HNM loop on a tiny synthetic cohort: a real kill -9 and rerun give the uninterrupted run's output; a rerun
with other settings is refused; every stage's settings are checked before the first stage; the round is chosen
on validation, never on test. The loop itself runs in one test (three processes), the rest in seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from features.errors import InputError
from features.synth.cohort import config_from, write_cohort
from mil.__main__ import main as mil_main
from mil.mining import loop, provenance, settings
from mil.training.command import MILCommand

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
ROUND0 = ("tile", "extract", "fit", "fit_seed1", "ensemble", "predict_train", "evaluate", "mine")


def loop_argv(cohort: Path, out: Path, rounds: int, mil_config: Path) -> list[str]:
    return [
        "--cohort.slides", str(cohort / "slides"), "--cohort.labels", str(cohort / "labels.csv"),
        "--cohort.annotations", str(cohort / "annotations"), "--out", str(out), "--rounds", str(rounds),
        "--encoder.name", "resnet10t",
        "--tiling_options", json.dumps({"mpp": 2.0, "patch_size": 32}),
        "--extract_options", json.dumps({"batch_size": 64, "num_workers": 0, "accelerator": "cpu"}),
        "--mil_config", str(mil_config),
        "--mil_options", json.dumps({"trainer": {"max_epochs": 2, "logger": False}, "data": {"max_patches_train": 64}}),
        "--ensemble_seeds", "[1]",
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


@pytest.fixture
def mil_config(tmp_path) -> Path:
    """A copy of the demo MIL config whose content a test may change."""
    path = tmp_path / "mil.yaml"
    shutil.copy(ROOT / "configs/demo/mil_abmil.yaml", path)
    return path


def hnm(argv: list[str], capsys) -> tuple[int, str, str]:
    """``mil hnm`` as a user runs it: exit code, stderr, stdout."""
    code = mil_main(["hnm", *argv])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def outputs(out: Path) -> dict[str, object]:
    """Everything a round produces that must not depend on whether the loop was interrupted."""
    found: dict[str, object] = {}
    for h5 in sorted(out.glob("round_*/**/*.h5")):
        with h5py.File(h5, "r") as handle:
            for name, data in handle.items():
                if isinstance(data, h5py.Dataset):
                    found[f"{h5.relative_to(out)}:{name}"] = np.asarray(data[()]).tobytes()
    for name in ("selection.csv", "selection_quality.json", "mil/predictions_val.csv", "mil/predictions_test.csv",
                 "mil_ensemble/predictions_test.csv"):
        for path in sorted(out.glob(f"round_*/{name}")):
            found[str(path.relative_to(out))] = path.read_bytes()
    for path in sorted(out.glob("round_*/encoder.safetensors")):
        found[str(path.relative_to(out))] = {k: v.numpy().tobytes() for k, v in load_file(path).items()}
    summary = pd.read_csv(out / loop.SUMMARY_NAME)
    found["summary"] = summary.drop(columns=[c for c in summary.columns if c.startswith("seconds_")]).to_csv()
    return found


@pytest.mark.slow
def test_kill_9_rerun_matches_uninterrupted_run_and_other_settings_are_refused(cohort, mil_config, tmp_path,
                                                                               capsys):
    """Two rounds as three `mil hnm` processes: one uninterrupted, one killed with SIGKILL while round 1's slide
    model trains, then the same command again. Then what the finished folder accepts and refuses."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "mil", "hnm"]
    out, killed = tmp_path / "run", tmp_path / "killed"
    argv = loop_argv(cohort, out, 1, mil_config)
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("uninterrupted", "victim")}  # noqa: SIM115
    uninterrupted = subprocess.Popen([*command, *argv], cwd=ROOT, env=env, stdout=logs["uninterrupted"],
                                     stderr=subprocess.STDOUT)
    victim = subprocess.Popen([*command, *loop_argv(cohort, killed, 1, mil_config)], cwd=ROOT, env=env,
                              stdout=logs["victim"], stderr=subprocess.STDOUT)
    fitting = killed / "round_1" / "mil"
    while not fitting.is_dir() and victim.poll() is None:  # kill -9 once round 1's slide model has begun training
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert (killed / "round_1" / ".extract.done").is_file() and not (killed / "round_1" / ".fit.done").exists()

    rerun = subprocess.run([*command, *loop_argv(cohort, killed, 1, mil_config)], cwd=ROOT, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "[round_1] finetune: done before, skipping" in rerun.stdout and "[round_1] fit ..." in rerun.stdout
    assert "validation did not choose the epoch kept" not in rerun.stdout  # the loop sums fits up in one line
    uninterrupted.wait(timeout=900)
    logs["uninterrupted"].seek(0)
    assert uninterrupted.returncode == 0, logs["uninterrupted"].read()[-3000:]
    expected, got = outputs(out), outputs(killed)
    assert {"round_0/selection.csv", "round_1/selection.csv", "round_1/encoder.safetensors"} <= set(expected)
    assert sum(key.endswith(":features") for key in expected) == 2 * 8
    assert got.keys() == expected.keys()
    assert [key for key in expected if got[key] != expected[key]] == []

    # What the loop made, and the round chosen on validation.
    first, second = out / "round_0", out / "round_1"
    assert all((first / f".{stage}.done").is_file() for stage in ROUND0)
    assert (first / "selection_quality.json").is_file() and (second / ".finetune.done").is_file()
    assert json.loads((second / "encoder.safetensors.json").read_text())["selection"] == str(first / "selection.csv")
    assert list((second / "features" / "features").iterdir())[0].name == "resnet10t-round1"
    table = pd.read_csv(out / loop.SUMMARY_NAME)
    assert table["round"].tolist() == [0, 1]
    assert {"val_slide_auc", "test_patch_auc", "lookalike_enrichment", "seconds_finetune"} <= set(table.columns)
    assert table.loc[table["chosen_on_val"], "round"].tolist() == [int(table["val_slide_auc"].idxmax())]

    # The folder says what made it, and each marker says what its stage ran with.
    config = yaml.safe_load((out / provenance.CONFIG_NAME).read_text())
    assert config["encoder"]["name"] == "resnet10t" and config["finetune_options"]["trainer"]["max_steps"] == 2
    finetune = json.loads((second / ".finetune.done").read_text())
    assert finetune["settings"]["selection"] == "<out>/round_0/selection.csv"
    assert finetune["settings"]["trainer"]["max_steps"] == 2 and finetune["settings"]["encoder"]["weights"] is None
    assert set(finetune["inputs"]) == {"<out>/round_0/.mine.done", "<out>/round_0/selection.csv"}
    assert json.loads((first / ".fit.done").read_text())["settings"]["trainer.max_epochs"] == "2"
    # The round reports the seed ensemble (validation AUC included); mining read the first fit's scores.
    assert json.loads((first / ".evaluate.done").read_text())["settings"]["run"] == "<out>/round_0/mil_ensemble"
    assert json.loads((first / ".fit_seed1.done").read_text())["settings"]["seed_everything"] == "1"
    ensemble = pd.read_csv(first / "mil_ensemble" / "predictions_test.csv").set_index("slide_id")["score"]
    members = [pd.read_csv(first / run / "predictions_test.csv").set_index("slide_id")["score"]
               for run in ("mil", "mil_seed1")]
    np.testing.assert_allclose(ensemble, ((members[0] + members[1].loc[members[0].index]) / 2).loc[ensemble.index])
    evaluated = json.loads((first / "mil_ensemble" / "metrics.json").read_text())["slide"]["validation"]["metrics"]
    assert table.loc[0, "val_slide_auc"] == pytest.approx(evaluated["auc"])
    assert table["slide_models"].tolist() == [2, 2]
    assert json.loads((first / ".mine.done").read_text())["settings"]["scores"] == "<out>/round_0/mil_train"
    markers = {p: p.read_text() for p in out.glob("round_*/.*.done")}

    # Other settings into the finished folder: one line naming the setting; nothing rerun or rewritten.
    for change, named in ((["--encoder.seed", "1"], "encoder.seed"),
                          (["--tiling_options", json.dumps({"mpp": 1.0, "patch_size": 32})], "tiling_options.mpp"),
                          (["--mining.neg_ratio", "0.3"], "mining.neg_ratio"),
                          (["--finetune_options", json.dumps({"trainer": {"max_steps": 3}})], "finetune_options")):
        code, err, _ = hnm([*argv, *change], capsys)
        assert code == 2 and named in err and "--overwrite true" in err and len(err.strip().splitlines()) == 1
    original = mil_config.read_text()
    mil_config.write_text(original.replace("lr: 2.0e-3", "lr: 1.0e-3"))
    code, err, _ = hnm(argv, capsys)
    assert code == 2 and "mil_config changed" in err
    mil_config.write_text(original)
    assert {p: p.read_text() for p in out.glob("round_*/.*.done")} == markers

    # Same settings: every stage is skipped, even with the cohort reached through another path.
    moved = tmp_path / "cohort_link"
    moved.symlink_to(cohort)
    code, _, printed = hnm(loop_argv(moved, out, 1, mil_config), capsys)
    assert code == 0 and printed.count("done before, skipping") == 2 * len(ROUND0)
    assert not re.search(r"^\[round_\d\] \w+ \.\.\.$", printed, flags=re.MULTILINE)

    # A stage whose input changed under it is not reused: round 1's fine-tuning read another selection.
    selection = pd.read_csv(first / "selection.csv")
    selection.iloc[:1].to_csv(first / "selection.csv", index=False)
    code, err, _ = hnm(argv, capsys)
    assert code == 2 and "round_1/.finetune.done" in err and "selection.csv" in err


@pytest.mark.parametrize("section, value, named", [
    ("--finetune_options", {"trainer": {"max_epochz": 2}}, "max_epochz"),
    ("--tiling_options", {"mpp": 2.0, "patch_sise": 32}, "patch_sise"),
    ("--extract_options", {"batch_size": "many"}, "batch_size"),
    ("--mil_options", {"model": {"lrr": 0.1}}, "model.lrr"),
    ("--evaluate_options", {"n_bootstrapp": 10}, "n_bootstrapp"),
    ("--finetune_options", {"selection": "x.csv"}, "finetune_options.selection"),
    ("--ensemble_seeds", [0], "first fit's seed_everything"),
    ("--ensemble_seeds", [2, 2], "listed twice"),
])
def test_a_bad_key_anywhere_stops_the_loop_before_any_stage(cohort, mil_config, tmp_path, capsys, section, value,
                                                            named):
    out = tmp_path / "run"
    code, err, _ = hnm([*loop_argv(cohort, out, 2, mil_config), section, json.dumps(value)], capsys)
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_gpu_config_on_a_machine_without_gpu_is_one_line(cohort, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err, _ = hnm(["--config", str(ROOT / "configs/hnm/camelyon16.yaml"), "--out", str(tmp_path / "run"),
                     "--cohort.slides", str(cohort / "slides"), "--cohort.labels", str(cohort / "labels.csv"),
                     "--cohort.annotations", str(cohort / "annotations")], capsys)
    assert code == 2 and "extract_options.accelerator" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_round_is_chosen_on_validation_auc_never_on_test(tmp_path):
    rows = [{"round": 0, "val_slide_auc": 0.70, "test_slide_auc": 0.99},
            {"round": 1, "val_slide_auc": 0.90, "test_slide_auc": 0.60},
            {"round": 2, "val_slide_auc": 0.80, "test_slide_auc": 0.95}]
    table = loop.write_summary(tmp_path, rows)
    assert table["chosen_on_val"].tolist() == [False, True, False]
    assert pd.read_csv(tmp_path / loop.SUMMARY_NAME)["chosen_on_val"].tolist() == [False, True, False]
    assert loop.validation_tie(table) is None


def test_rounds_tied_on_validation_auc_are_reported_in_one_line(tmp_path):
    rows = [{"round": 0, "val_slide_auc": 1.0}, {"round": 1, "val_slide_auc": 0.9}, {"round": 2, "val_slide_auc": 1.0}]
    warning = loop.validation_tie(loop.write_summary(tmp_path, rows))
    assert warning is not None and "rounds 0, 2" in warning and "keeps round 0" in warning and "\n" not in warning


def test_stage_marker_made_with_other_settings_is_refused(tmp_path):
    spell = loop.spelling(settings.HNMArgs(cohort=settings.Cohort(slides="s", labels="l"), out=str(tmp_path)))
    ran = []
    fit = MILCommand("l", {"trainer.max_epochs": 2})
    loop.Stages(tmp_path, spell).run("fit", lambda: ran.append(1), fit.recorded())
    loop.Stages(tmp_path, spell).run("fit", lambda: ran.append(2), fit.recorded())
    assert ran == [1]
    assert json.loads((tmp_path / ".fit.done").read_text())["settings"]["config"] == "<cohort.labels>"
    with pytest.raises(InputError, match=r"stage fit ran with other settings .*trainer.max_epochs was '2', now '3'"):
        other = fit.updated({"trainer.max_epochs": 3})
        loop.Stages(tmp_path, spell).run("fit", lambda: ran.append(3), other.recorded())
    assert ran == [1]


def test_display_settings_do_not_stop_a_resume(tmp_path):
    """A marker written with the model summary on (as before the loop's fits were quiet) still resumes."""
    spell = loop.spelling(settings.HNMArgs(cohort=settings.Cohort(slides="s", labels="l"), out=str(tmp_path)))
    ran = []
    fit = MILCommand("l", {"trainer.max_epochs": 2})
    loop.Stages(tmp_path, spell).run("fit", lambda: ran.append(1), fit.recorded())
    marker = tmp_path / ".fit.done"
    record = json.loads(marker.read_text())
    assert record["settings"] == {"config": "<cohort.labels>", "trainer.max_epochs": "2"}
    record["settings"]["trainer.enable_model_summary"] = "true"
    marker.write_text(json.dumps(record))
    quiet = fit.updated({"trainer": {"enable_model_summary": False, "enable_progress_bar": False}})
    loop.Stages(tmp_path, spell).run("fit", lambda: ran.append(2), quiet.recorded())
    assert ran == [1]
    with pytest.raises(InputError, match="trainer.max_epochs was '2', now '3'"):
        other = quiet.updated({"trainer.max_epochs": 3})
        loop.Stages(tmp_path, spell).run("fit", lambda: ran.append(3), other.recorded())


def test_a_setting_added_since_a_folder_was_made_resumes_at_its_default(tmp_path):
    """A loop folder and a stage marker written before a setting existed resume while it holds its default (which
    keeps what the code did before it), and are refused once it does not."""
    from mil.mining.cli import MineArgs

    args = settings.HNMArgs(cohort=settings.Cohort(slides="s", labels="l"), out=str(tmp_path))
    provenance.prepare_folder(args)
    stored = yaml.safe_load((tmp_path / provenance.CONFIG_NAME).read_text())
    del stored["mining"]["normal_quantile"]  # as written before the setting existed
    (tmp_path / provenance.CONFIG_NAME).write_text(yaml.safe_dump(stored))
    provenance.prepare_folder(args)
    (tmp_path / provenance.CONFIG_NAME).write_text(yaml.safe_dump(stored))
    args.mining.normal_quantile = 0.99
    with pytest.raises(InputError, match="mining.normal_quantile was '<absent>', now 0.99"):
        provenance.prepare_folder(args)

    spell, ran = loop.spelling(args), []
    mine = MineArgs(scores="s", labels="l", out="o")
    loop.Stages(tmp_path, spell).run("mine", lambda: ran.append(1), mine)
    marker = tmp_path / ".mine.done"
    record = json.loads(marker.read_text())
    del record["settings"]["mining"]["normal_quantile"]
    marker.write_text(json.dumps(record))
    loop.Stages(tmp_path, spell).run("mine", lambda: ran.append(2), mine)
    assert ran == [1]
    mine.mining.normal_quantile = 0.99
    with pytest.raises(InputError, match="stage mine ran with other settings .*normal_quantile was '<absent>'"):
        loop.Stages(tmp_path, spell).run("mine", lambda: ran.append(3), mine)


def test_fits_whose_epoch_validation_did_not_choose_are_summed_up_in_one_line(tmp_path):
    """The loop holds each fit's tied-epoch line and says it once, counting only fits that kept the first tied
    epoch (not those a tie-breaker chose, nor untied ones), over the rounds it ran."""
    def summary(folder: str, **values) -> None:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "fit_summary.json").write_text(json.dumps({"epochs": 30, **values}))

    summary("round_0/mil", best_epoch=0, epochs_tied_with_best=list(range(29)))
    summary("round_0/mil_seed1", best_epoch=3, epochs_tied_with_best=[3])
    summary("round_1/mil", best_epoch=1, epochs_tied_with_best=[1, 2, 5])
    summary("round_1/mil_seed1", best_epoch=7, epochs_tied_with_best=[1, 7], tie_breaker="val_loss")
    summary("round_2/mil", best_epoch=0, epochs_tied_with_best=[0, 1])  # not among the rounds asked about
    line = loop.tied_fits(tmp_path, [0, 1])
    assert line.startswith("2 of 4 slide-model fits kept the first of several epochs tied on validation AUC "
                           "(29 of 30, 3 of 30 epochs tied)"), line
    assert loop.tied_fits(tmp_path, [3]) is None
    assert loop.tied_fits(tmp_path / "round_0", []) is None


def test_overwrite_discards_earlier_rounds_and_keeps_other_files(cohort, tmp_path):
    args = settings.HNMArgs(cohort=settings.Cohort(slides=str(cohort / "slides"), labels=str(cohort / "labels.csv")),
                            out=str(tmp_path))
    provenance.prepare_folder(args)
    (tmp_path / "round_0").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    args.encoder.seed = 7
    with pytest.raises(InputError, match="encoder.seed was 0, now 7"):
        provenance.prepare_folder(args)
    args.overwrite = True
    provenance.prepare_folder(args)
    assert not (tmp_path / "round_0").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    stored = yaml.safe_load((tmp_path / provenance.CONFIG_NAME).read_text())
    assert stored["encoder"]["seed"] == 7 and stored["overwrite"] is False
    (tmp_path / provenance.CONFIG_NAME).unlink()
    (tmp_path / "round_0").mkdir()
    args.overwrite = False
    with pytest.raises(InputError, match="holds loop rounds but no hnm_config.yaml"):
        provenance.prepare_folder(args)


def test_a_mil_command_records_settings_as_yaml_and_resolves_them_on_its_config(tmp_path):
    """Markers spell a nested section as dotted keys (a model's kwargs stay one value); what LightningCLI reads is
    the config file with the settings on top, and a new class drops the old class's arguments."""
    config = tmp_path / "mil.yaml"
    config.write_text("trainer: {max_epochs: 10, accelerator: cpu}\n"
                      "model: {aggregator: {class_path: mil.aggregators.ABMIL, init_args: {hidden_dim: 32}}}\n")
    command = MILCommand(str(config)).updated(
        {"trainer": {"max_epochs": 2, "logger": False}, "model_kwargs": {"a": 1}, "x": None})
    assert command.recorded() == {"config": str(config), "trainer.max_epochs": "2", "trainer.logger": "false",
                                  "model_kwargs": '{"a": 1}', "x": "null"}
    resolved = command.resolved()
    assert resolved["trainer"] == {"max_epochs": 2, "accelerator": "cpu", "logger": False}
    assert resolved["model"]["aggregator"]["init_args"] == {"hidden_dim": 32}
    other = command.updated({"model.aggregator.class_path": "mil.aggregators.DSMIL"}).resolved()
    assert other["model"]["aggregator"] == {"class_path": "mil.aggregators.DSMIL"}
    config.write_text("trainer: [unclosed\n")
    with pytest.raises(InputError, match=r"mil.yaml: YAML syntax error at line 2"):
        command.resolved()


def test_stage_made_by_other_code_is_reused_and_said_so(tmp_path, monkeypatch, capsys):
    spell = loop.spelling(settings.HNMArgs(cohort=settings.Cohort(slides="s", labels="l"), out=str(tmp_path)))
    ran = []
    loop.Stages(tmp_path, spell).run("fit", lambda: ran.append(1), {"a": 1})
    recorded = json.loads((tmp_path / ".fit.done").read_text())["code"]
    assert recorded == provenance.code_fingerprint() and len(recorded) == 12
    loop.Stages(tmp_path, spell).run("fit", lambda: ran.append(2), {"a": 1})
    assert "other hnm-mil code" not in capsys.readouterr().out
    monkeypatch.setattr(loop, "code_fingerprint", lambda: "0123456789ab")
    loop.Stages(tmp_path, spell).run("fit", lambda: ran.append(3), {"a": 1})
    line = capsys.readouterr().out.strip()
    assert ran == [1] and f"by other hnm-mil code ({recorded}, now 0123456789ab)" in line and "\n" not in line


def test_summary_validation_auc_is_that_of_the_written_predictions(tmp_path):
    """The written predictions' validation AUC (the slide score the test column uses), not the fit's monitor."""
    here = settings.round_paths(tmp_path, 0)
    here.mil.mkdir(parents=True)
    (here.mil / "fit_summary.json").write_text(json.dumps({"best_val_auc": 1.0}))
    metrics = {"slide": {"evaluated_split": "test", "metrics": {"auc": {"value": 0.9}},
                         "validation": {"metrics": {"auc": 0.75}}}, "patch": {}}
    (here.mil / "metrics.json").write_text(json.dumps(metrics))
    assert loop.summary_row(0, here, {}, here.mil)["val_slide_auc"] == 0.75
    del metrics["slide"]["validation"]  # a run evaluated without validation predictions: the fit's record
    (here.mil / "metrics.json").write_text(json.dumps(metrics))
    assert loop.summary_row(0, here, {}, here.mil)["val_slide_auc"] == 1.0


def test_a_round_reports_its_seed_ensemble_where_the_loop_made_one(tmp_path):
    """The demo's heatmaps and the viewer's round sources read the run the summary reports."""
    here = settings.round_paths(tmp_path, 1)
    (here.mil).mkdir(parents=True)
    assert here.reported == tmp_path / "round_1" / "mil"
    here.mil_ensemble.mkdir()
    assert here.reported == tmp_path / "round_1" / "mil_ensemble"
