"""Shared pytest set-up: deterministic, quiet, offline, and small enough for a 2-core machine."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_collection_modifyitems(items: list) -> None:
    """Run the tests marked ``slow`` first (the README's, collected last, leading): started last, one of them would
    leave the other worker idle at the end of ``make test``."""
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    items[:] = slow[::-1] + [item for item in items if item.get_closest_marker("slow") is None]
