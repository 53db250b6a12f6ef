"""Sharding slides over processes and devices with Lightning Fabric.

Every process (``devices`` per node x ``num_nodes``) takes the slides ``i % world_size == rank``, writes its own
feature files and its own manifest part; rank 0 merges the parts into ``manifest.csv`` at the end. Slides are
independent, so no gradients or tensors are exchanged: the process group is used only for the final barrier.
With one device Fabric just picks it (GPU if there is one, else CPU) and runs in this process.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from features.errors import InputError
from features.store import MANIFEST_NAME, Manifest

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place in the run."""

    rank: int
    world_size: int
    device: torch.device
    barrier: Callable[[], None]

    def take(self, items: Sequence[T]) -> list[T]:
        return [item for i, item in enumerate(items) if i % self.world_size == self.rank]


def launch(work: Callable[[Shard], T], accelerator: str = "auto", devices: int = 1, num_nodes: int = 1) -> T:
    """Run ``work`` once per process (spawning ``devices`` processes per node when more than one)."""
    from lightning.fabric import Fabric

    if devices < 1 or num_nodes < 1:
        raise InputError(f"--devices {devices} --num_nodes {num_nodes}: both must be at least 1")
    accelerator = {"gpu": "cuda"}.get(accelerator, accelerator)
    world = devices * num_nodes
    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                        strategy="ddp" if world > 1 else "auto")
    except (ValueError, RuntimeError) as error:
        raise InputError(f"--accelerator {accelerator} --devices {devices}: {error}") from None

    def body(fabric: Fabric) -> T:
        return work(Shard(fabric.global_rank, fabric.world_size, fabric.device, fabric.barrier))

    return fabric.launch(body)


def default_threads(shard: Shard) -> int:
    """Split this node's cores between the processes running a model on CPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, shard.world_size if shard.device.type == "cpu" else 1)
    return max(1, cores // local)


def manifest_for(out: str | Path, shard: Shard) -> Manifest:
    """The manifest this process writes: ``manifest.csv`` alone, or its own part when sharded."""
    name = MANIFEST_NAME if shard.world_size == 1 else f"manifest.rank{shard.rank}.csv"
    return Manifest(Path(out) / name)


def merge_manifests(out: str | Path) -> Manifest:
    """Fold every ``manifest.rank*.csv`` (this run's and a killed run's) into ``manifest.csv``."""
    out = Path(out)
    merged = Manifest(out / MANIFEST_NAME)
    parts = sorted(out.glob("manifest.rank*.csv"))
    for part in parts:
        with part.open(newline="") as handle:
            for row in csv.DictReader(handle):
                merged.update(row)
    if parts:
        merged.save()
        for part in parts:
            part.unlink()
    return merged
