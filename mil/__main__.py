"""``mil``: bags of embeddings -> slide models -> evaluation, heatmaps -> pseudo-labels and mining."""

from __future__ import annotations

import sys

from features.commands import dispatch

COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("mil.training.cli:fit", "train a slide model (LightningCLI: --config configs/mil/abmil.yaml)"),
    "validate": ("mil.training.cli:validate", "evaluate a checkpoint on the validation split"),
    "test": ("mil.training.cli:test", "evaluate a checkpoint on the test split; writes predictions and patch scores"),
    "predict": ("mil.training.cli:predict", "score slides with a checkpoint; writes predictions and patch scores"),
    "split": ("mil.data.splits:main", "write stratified / case-grouped fold CSVs, or import CLAM splits"),
    "cv": ("mil.evaluation.cv:main", "run every fold (and seed) and print mean ± std"),
    "evaluate": ("mil.evaluation.cli:main", "slide metrics with bootstrap CIs; patch metrics when annotations exist"),
    "ensemble": ("mil.evaluation.ensemble:main", "average several runs' predictions and patch scores (seeds)"),
    "heatmap": ("mil.evaluation.heatmap:main", "PNG overlays of patch scores on slide thumbnails"),
    "qupath": ("mil.evaluation.qupath:main", "GeoJSON for QuPath: every patch as a scored tile, the mined selection"),
    "mine": ("mil.mining.cli:main", "pseudo-labels and hard negatives from a model's patch scores"),
    "hnm": ("mil.mining.loop:main", "the full hard-negative mining loop, resumable, for N rounds"),
    "view": ("mil.viewer.cli:main", "a local web viewer: slides, heatmaps and mined patches, round by round"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("mil", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
