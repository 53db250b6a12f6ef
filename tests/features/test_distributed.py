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


def node_env(node_rank: int, port: int) -> dict[str, str]:
    """What a cluster launcher (srun, torchrun --nnodes) sets for one process of a two-node job, one device each."""
    return {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node_rank),
            "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_nodes(root: Path, out: Path) -> list[subprocess.Popen]:
    port = free_port()
    argv = cli("--slides", str(root / "slides"), "--out", str(out), *ARGS, "--devices", "1", "--num_nodes", "2")
    return [subprocess.Popen(argv, env=node_env(rank, port), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for rank in (0, 1)]


def test_two_nodes_shard_disjointly_and_match_one_process(slides):
    root, reference = slides
    out = root / "nodes"
    nodes = launch_nodes(root, out)
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-1500:] + outputs[1][1][-1500:]
    assert "extracted 5 slides" in outputs[0][0]  # node 0 speaks for the whole run
    assert_same_outputs(out, reference)
    for name in sorted(p.name for p in (reference / "features" / TAG).glob("*.h5")):
        assert (out / "features" / TAG / name).read_bytes() == (reference / "features" / TAG / name).read_bytes()


def test_a_killed_node_is_picked_up_by_a_rerun(slides):
    root, reference = slides
    out = root / "node_killed"
    nodes = launch_nodes(root, out)
    folder = out / "features" / TAG
    deadline = time.time() + 180
    while time.time() < deadline and not (folder.is_dir() and any(p.suffix == ".h5" for p in folder.iterdir())):
        time.sleep(0.05)
    nodes[1].kill()  # the node dies mid-run; its partner cannot finish the job alone and is ended as a scheduler would
    nodes[1].wait()
    nodes[0].kill()
    nodes[0].wait()
    assert len([p for p in folder.iterdir() if p.suffix == ".h5"]) < 5, "the run was not interrupted mid-way"
    subprocess.run(cli("--slides", str(root / "slides"), "--out", str(out), *ARGS), check=True, env=env(), cwd=ROOT,
                   capture_output=True)
    assert_same_outputs(out, reference)


def test_shards_over_nodes_are_disjoint_and_cover_every_slide():
    import torch

    from features.extraction.distributed import Shard

    slides = [f"s{i}" for i in range(11)]
    parts = [Shard(rank, 4, torch.device("cpu"), lambda: None).take(slides) for rank in range(4)]
    assert sorted(sum(parts, [])) == sorted(slides)
    assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1:])
