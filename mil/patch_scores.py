"""The patch-scores format: ``patch_scores/<slide_id>.h5`` in a run directory, written by ``mil test|predict``.

Datasets ``coords`` (N, 2) int64 level-0 top-left corners, ``scores`` (N,) the model's tumor logit per patch
(higher = more tumor-like) and, where the model has one, ``attention`` (N,). The file attribute
``feature_settings`` (JSON) holds the settings of the features the model scored (encoder, weights checksum,
tiling), so a reader that also opens features (mining's twin test) can refuse features of another make.
Evaluation, heatmaps and mining all read it through this module, so the format lives in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from features.errors import InputError
from features.store import atomic_path, h5_files, safe_slide_id

PATCH_SCORES_DIR = "patch_scores"
SCORE_DATASETS = {"instance": "scores", "scores": "scores", "attention": "attention"}
FEATURE_SETTINGS_ATTR = "feature_settings"


def write_patch_scores(run_dir: str | Path, slide_id: str, coords: np.ndarray, scores: np.ndarray,
                       attention: np.ndarray | None = None,
                       feature_settings: Mapping[str, Any] | None = None) -> Path:
    """Write one slide's patch scores atomically; rows align with ``coords``."""
    path = Path(run_dir) / PATCH_SCORES_DIR / f"{safe_slide_id(slide_id)}.h5"
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("coords", data=coords)
        h5.create_dataset("scores", data=scores)
        if attention is not None:
            h5.create_dataset("attention", data=attention)
        h5.attrs["slide_id"] = slide_id
        h5.attrs["scores"] = "tumor logit per patch (higher = more tumor-like)"
        if feature_settings is not None:
            h5.attrs[FEATURE_SETTINGS_ATTR] = json.dumps(feature_settings, sort_keys=True)
    return path


def scored_feature_settings(files: Mapping[str, Path]) -> dict[str, Any] | None:
    """The settings of the features a folder's scores came from (None: files written before they were recorded).

    Files scored from features of different makes (a folder mixed by two runs) are refused in one line.
    """
    found: tuple[Path, str] | None = None
    for path in files.values():
        try:
            with h5py.File(path, "r") as h5:
                value = h5.attrs.get(FEATURE_SETTINGS_ATTR)
        except OSError as error:
            raise InputError(f"{path}: cannot read patch scores ({error}); rerun `mil test` or `mil predict`") from None
        if value is None:
            continue
        value = value.decode() if isinstance(value, bytes) else str(value)
        if found is None:
            found = (path, value)
        elif value != found[1]:
            raise InputError(f"{path.parent}: patch scores from features of different makes ({found[0].name} vs "
                             f"{path.name}); rerun `mil predict` into a new run folder")
    return None if found is None else json.loads(found[1])


def find_patch_scores(folder: str | Path) -> dict[str, Path]:
    """slide_id -> patch scores file, from a run directory or its ``patch_scores`` folder."""
    folder = Path(folder)
    if (folder / PATCH_SCORES_DIR).is_dir():
        folder = folder / PATCH_SCORES_DIR
    files = {p.stem: p for p in h5_files(folder)}
    if not files:
        raise InputError(f"{folder}: no patch_scores/*.h5 files; run `mil test` or `mil predict` with this run")
    return files


def read_patch_scores(path: str | Path, score: str = "instance") -> tuple[np.ndarray, np.ndarray]:
    """(coords (N, 2) int64, values (N,)) from one file; ``score`` is ``instance`` (``scores``) or ``attention``."""
    if score not in SCORE_DATASETS:
        raise InputError(f"--score {score!r}: choose instance or attention")
    dataset = SCORE_DATASETS[score]
    try:
        with h5py.File(path, "r") as h5:
            if dataset not in h5:
                raise InputError(f"{path}: has no {dataset!r} dataset; this model writes {sorted(h5.keys())}")
            coords = np.asarray(h5["coords"][:], dtype=np.int64).reshape(-1, 2)
            values = np.asarray(h5[dataset][:], dtype=np.float64).reshape(-1)
    except (OSError, KeyError) as error:
        raise InputError(f"{path}: cannot read patch scores ({error}); rerun `mil test` or `mil predict`") from None
    if len(coords) != len(values):
        raise InputError(f"{path}: {len(coords)} coords but {len(values)} {dataset}; rerun `mil test` or `mil predict`")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise InputError(f"{path}: {dataset} row {bad[0]} is {values[bad[0]]} ({len(bad)} non-finite of {len(values)}); "
                         "the model or its features are broken: check the features for NaN/Inf, retrain, and rerun "
                         "`mil predict`")
    return coords, values
