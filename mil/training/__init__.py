"""Training: the LightningModule, the ``mil fit|validate|test|predict`` CLI and the run-directory outputs."""

from mil.training.module import MILModule

__all__ = ["MILModule"]
