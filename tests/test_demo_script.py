"""``make demo`` reports bad input like every command: one line naming the folder and the make-level fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import demo


def test_a_folder_left_by_another_demo_is_one_line_with_the_make_fix(tmp_path, monkeypatch, capsys):
    cohort = tmp_path / "cohort"
    (cohort / "annotations").mkdir(parents=True)
    (cohort / "slides.csv").write_text("slide_id,path\n")
    (cohort / "labels.csv").write_text("slide_id,label,split\n")
    (tmp_path / "hnm" / "round_0").mkdir(parents=True)  # rounds without the settings that made them
    monkeypatch.setattr(demo, "synth", lambda argv: None)  # the cohort above stands in for the synthetic one
    monkeypatch.setattr("sys.argv", ["demo.py", "--out", str(tmp_path)])
    monkeypatch.chdir(Path(demo.__file__).resolve().parents[1])
    assert demo.demo() == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {tmp_path / 'hnm'}: holds loop rounds but no hnm_config.yaml")
    assert error.endswith("(make demo: `make clean` removes its folder, or run `make demo OUT=<new folder>`)")
    assert "\n" not in error and (tmp_path / "hnm" / "round_0").is_dir()


def test_an_internal_failure_is_not_dressed_as_bad_input(monkeypatch, capsys):
    monkeypatch.setattr(demo, "main", lambda: 1 / 0)
    assert demo.demo() == 1
    assert "internal error: ZeroDivisionError" in capsys.readouterr().err


def test_the_compared_aggregators_sum_up_their_tied_epochs_in_one_line(tmp_path, monkeypatch, capsys):
    import json

    from mil.training import cli

    held = []

    def fake_fit(argv: list[str]) -> None:  # records what a finished fit records; two of three tied
        held.append(cli._TIED_EPOCH_LINES_HELD)
        run = Path(argv[argv.index("--trainer.default_root_dir") + 1])
        (run / "patch_scores").mkdir(parents=True)
        (run / "patch_scores" / "slide.h5").touch()
        tied = [0] if len(held) == 3 else [0, 1, 2]
        (run / "fit_summary.json").write_text(json.dumps({"epochs_tied_with_best": tied, "epochs": 30}))

    def fake_evaluate(argv: list[str]) -> None:
        run = Path(argv[argv.index("--run") + 1])
        auc = {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
        (run / "metrics.json").write_text(json.dumps({"slide": {"metrics": {"auc": auc}}}))

    monkeypatch.setattr(demo, "fit", fake_fit)
    monkeypatch.setattr(demo, "evaluate", fake_evaluate)
    table = demo.compare_models(tmp_path, tmp_path / "cohort", tmp_path / "features")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert held == [True, True, True] and not cli._TIED_EPOCH_LINES_HELD
    assert len(warnings) == 1 and "2 of 3 slide-model fits" in warnings[0]
    assert len(table) == len(demo.MODELS)
