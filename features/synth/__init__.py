"""Synthetic H&E-like cohorts with known tumor and look-alike regions, for testing hard-negative mining.

``write_cohort`` writes pyramidal TIFF slides, ``slides.csv``, ``labels.csv`` and ASAP XML annotations;
``write_point_cohort`` writes mitosis-like point-annotated images with a COCO file. See docs/synthetic_cohort.md.
"""

from features.synth.cohort import CohortConfig, CohortPaths, PRESETS, config_from, plan_cohort, write_cohort
from features.synth.points import PointCohortPaths, PointConfig, write_point_cohort

__all__ = ["CohortConfig", "CohortPaths", "PRESETS", "PointCohortPaths", "PointConfig", "config_from", "plan_cohort",
           "write_cohort", "write_point_cohort"]
