"""Bag losses; ``ranking.py`` holds the patch-wise ranking loss."""

from mil.losses.bag import BagLoss, classification_loss, max_instance_loss
from mil.losses.ranking import patch_ranking_loss, top_k_mean

__all__ = ["BagLoss", "classification_loss", "max_instance_loss", "patch_ranking_loss", "top_k_mean"]
