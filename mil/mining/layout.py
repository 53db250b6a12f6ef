"""Where one ``mil hnm`` round keeps each stage's output (``DIR/round_<r>/...``), in one light module.

The loop, the demo script and the viewer all find a round's runs through it, and it imports nothing heavy, so
the viewer starts without loading PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RoundPaths:
    root: Path

    @property
    def store(self) -> Path:
        return self.root / "features"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder.safetensors"

    @property
    def mil(self) -> Path:
        return self.root / "mil"

    def mil_seed(self, seed: int) -> Path:
        return self.root / f"mil_seed{seed}"

    @property
    def mil_ensemble(self) -> Path:
        return self.root / "mil_ensemble"

    @property
    def reported(self) -> Path:
        """The run whose numbers the round reports: the seed ensemble where the loop made one, else the fit."""
        return self.mil_ensemble if self.mil_ensemble.is_dir() else self.mil

    @property
    def mil_train(self) -> Path:
        return self.root / "mil_train"

    @property
    def selection(self) -> Path:
        return self.root / "selection.csv"

    def features(self, tag: str) -> Path:
        return self.store / "features" / tag


def round_paths(out: Path, index: int) -> RoundPaths:
    return RoundPaths(out / f"round_{index}")
