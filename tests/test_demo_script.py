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
