"""Evaluation: slide metrics with bootstrap CIs, thresholds chosen on validation, patch-level truth,
cross-validation summaries and heatmaps."""
