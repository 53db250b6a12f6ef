"""``features``: slides -> tissue -> patch coordinates -> embeddings, and encoder training."""

from __future__ import annotations

import sys

from features.commands import dispatch

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("features.synth.cli:main", "write a synthetic cohort: pyramidal TIFF slides, labels CSV, annotations"),
    "tile": ("features.extraction.cli:tile", "find tissue and write patch coordinates, one HDF5 per slide"),
    "extract": ("features.extraction.cli:extract", "tile and embed every patch with a timm encoder, one HDF5 per slide"),
    "pretrain": ("features.training.pretrain:main", "self-supervised (SimCLR) pretraining of an encoder on a cohort"),
    "finetune": ("features.training.finetune:main", "fine-tune an encoder on a mined patch selection (SupCon)"),
    "heads": ("features.heads.cli:main", "train small patch-level heads on stored embeddings"),
    "select": ("features.heads.select:main", "rank candidate encoders on a labelled proxy task"),
    "regimes": ("features.heads.regimes:main", "search hard-negative regimes for a patch-level head"),
    "export": ("features.export:main", "write a feature store as a CLAM or TRIDENT folder (--layout clam|trident)"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("features", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
