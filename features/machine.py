"""What this machine offers a command: the CPU cores this process may run on (not all cores of the host)."""

from __future__ import annotations

import os

MAX_DEFAULT_WORKERS = 8  # beyond this, slide decoding rarely keeps up with more processes than it costs in memory


def available_cores() -> int:
    """Cores this process may use: the affinity mask (containers, ``taskset``, SLURM), else the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """DataLoader workers when none are given: one per available core, at most :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(available_cores(), MAX_DEFAULT_WORKERS))
