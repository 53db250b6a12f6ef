"""Sharding over 2 CPU processes gives the same files as one process; a killed run resumes to the same result."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.store import TMP_MARKER, read_bag
from fixtures import write_tiny_slide

ROOT = Path(__file__).resolve().parents[2]
TAG = "resnet10t-random-seed0"
ARGS = ["--patch_size", "64", "--batch_size", "8", "--num_workers", "0", "--threads", "1",
        "--encoder.name", "resnet10t", "--accelerator", "cpu"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "features", "extract", *args]


def env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for i in range(5):
        write_tiny_slide(root / "slides" / f"s{i}.tiff", width=1024, height=768, seed=i)
    reference = root / "reference"
    subprocess.run(cli("--slides", str(root / "slides"), "--out", str(reference), *ARGS), check=True, env=env(),
                   cwd=ROOT, capture_output=True)
    return root, reference


def assert_same_outputs(out: Path, reference: Path) -> None:
    files = sorted(p.name for p in (reference / "features" / TAG).glob("*.h5"))
    assert files == sorted(p.name for p in (out / "features" / TAG).glob("*.h5")) and len(files) == 5
    for name in files:
        a, b = read_bag(out / "features" / TAG / name), read_bag(reference / "features" / TAG / name)
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.features, b.features)
    assert not [p for p in out.rglob(f"*{TMP_MARKER}*")]
    manifest = pd.read_csv(out / "manifest.csv")
    assert sorted(manifest["slide_id"]) == [f"s{i}" for i in range(5)] and set(manifest["status"]) == {"ok"}


def test_two_processes_match_one(slides):
    root, reference = slides
    out = root / "ddp"
    result = subprocess.run(cli("--slides", str(root / "slides"), "--out", str(out), *ARGS, "--devices", "2"),
                            env=env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_outputs(out, reference)
    assert not list(out.glob("manifest.rank*.csv"))
    assert "extracted 5 slides" in result.stdout


def test_killed_run_resumes_to_identical_outputs(slides):
    root, reference = slides
    out = root / "killed"
    process = subprocess.Popen(cli("--slides", str(root / "slides"), "--out", str(out), *ARGS), env=env(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    folder = out / "features" / TAG
    while time.time() < deadline and not (folder.is_dir() and any(p.suffix == ".h5" for p in folder.iterdir())):
        time.sleep(0.05)
    process.kill()
    process.wait()
    finished = [p for p in folder.iterdir() if p.suffix == ".h5"]
    assert 1 <= len(finished) < 5, "the run was not interrupted mid-way"
    subprocess.run(cli("--slides", str(root / "slides"), "--out", str(out), *ARGS), check=True, env=env(), cwd=ROOT,
                   capture_output=True)
    assert_same_outputs(out, reference)
