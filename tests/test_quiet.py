"""A quiet terminal: a real `mil fit` prints no library warnings or tips on stderr; `--verbose` lets them through;
worker counts follow the machine."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from features.machine import available_cores, default_workers
from features.quiet import quiet_terminal
from tests.fixtures import synthetic_bags

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("warning", "tip:", "deprecat", "gpu available", "seed set", "does not have many workers", "\x1b[")


def run_fit(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    folder, labels = synthetic_bags(tmp_path / "cohort", n_slides=8, n_patches=12, dim=8)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    env.pop("HNM_VERBOSE", None)
    command = [sys.executable, "-m", "mil", "fit", "--config", str(ROOT / "configs/demo/mil_abmil.yaml"),
               "--data.features", str(folder), "--data.labels", str(labels), "--trainer.max_epochs", "1",
               "--trainer.default_root_dir", str(tmp_path / "run"), *extra]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_mil_fit_prints_no_library_chatter(tmp_path):
    """Unfiltered, this run prints Lightning's tip, "GPU available", "Seed set" and deprecation warnings."""
    result = run_fit(tmp_path)
    assert result.returncode == 0, result.stderr
    noisy = [line for line in result.stderr.splitlines() if any(n in line.lower() for n in NOISE)]
    assert not noisy, noisy


def test_quiet_terminal_filters_in_process_and_strips_the_flag(monkeypatch):
    for name in ("HNM_VERBOSE", "PYTHONWARNINGS", "WANDB_SILENT", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        try:
            assert quiet_terminal(["--data.x", "1"]) == ["--data.x", "1"]
            warnings.warn("old API", DeprecationWarning)
            assert not logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)
        finally:
            logging.disable(logging.NOTSET)
    assert not caught and os.environ["WANDB_SILENT"] == "true"
    assert os.environ["TQDM_DISABLE"] == "1"  # pytest captures stderr: not a TTY, so no bars in the log
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert quiet_terminal(["--verbose", "--k", "3"]) == ["--k", "3"]
        warnings.warn("old API", DeprecationWarning)
    assert caught


def test_worker_default_follows_the_affinity_mask():
    assert available_cores() == len(os.sched_getaffinity(0))
    assert 1 <= default_workers() <= min(available_cores(), 8)
