"""What the viewer may show: the slides, their scores per source (the run, each mining round) and mined patches.

Everything is resolved once, before the server starts, so bad input fails with one line and exit 2 and every
request afterwards can only name things this catalogue holds: a slide id from the slides list that has patch
scores, a source key (``run``, ``r0``, ``r1`` ...), a patch position that some source scored. Nothing else on
disk is reachable through the viewer.

Sources: ``--run RUN`` (any aggregator's ``mil test|predict`` run: ``patch_scores/``, ``predictions*.csv``,
``metrics.json``, ``config.yaml``) and, with ``--hnm DIR``, every ``round_<r>`` of a ``mil hnm`` folder
(``mil/`` scores the val/test slides, or ``mil_ensemble/`` where the loop reports a seed ensemble,
``mil_train/`` the training slides, ``selection.csv`` the mined patches,
``selection_quality.json`` when annotations existed).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from features.errors import InputError
from features.store import find_feature_files, h5_files, read_attrs
from mil.mining.layout import RoundPaths
from mil.patch_scores import PATCH_SCORES_DIR, read_patch_scores

log = logging.getLogger(__name__)

ROUND_DIR = re.compile(r"^round_(\d+)$")
KINDS = ("positive", "hard_negative")


@dataclass
class Source:
    """One set of patch scores: a run directory, or the union of one mining round's two runs."""

    key: str  # "run" or "r<index>"; the only spelling requests may use
    title: str
    runs: list[Path]
    files: dict[str, Path] = field(default_factory=dict)  # slide_id -> patch scores file
    predictions: pd.DataFrame = field(default_factory=pd.DataFrame)  # slide_id, label, score, split
    features: list[Path] = field(default_factory=list)  # feature folders the runs were trained on

    def load(self) -> Source:
        for run in self.runs:
            folder = run / PATCH_SCORES_DIR
            if folder.is_dir():
                self.files.update({p.stem: p for p in h5_files(folder)})
            tables = [pd.read_csv(p) for p in sorted(run.glob("predictions*.csv"))]
            tables = [t for t in tables if {"slide_id", "score"} <= set(t.columns)]
            if tables:
                self.predictions = pd.concat([self.predictions, *tables]).drop_duplicates("slide_id", keep="first")
            self.features += _config_features(run)
        return self


@dataclass
class Round:
    """One ``round_<r>`` of a mining loop: its scores and what was mined from them."""

    index: int
    source: Source
    selection: pd.DataFrame
    quality: dict[str, Any]


@dataclass
class Slide:
    slide_id: str
    path: Path
    label: str
    split: str
    score: float | None
    prediction: str


@dataclass
class Catalog:
    slides: dict[str, Slide]
    sources: dict[str, Source]
    rounds: list[Round]
    annotations: Path | None
    threshold: float
    threshold_source: str
    features_override: Path | None = None
    patch_sizes: dict[str, int] = field(default_factory=dict)  # filled on first use, per slide

    def source(self, key: str) -> Source:
        if key not in self.sources:
            raise KeyError(key)
        return self.sources[key]

    def sources_of(self, slide_id: str) -> list[str]:
        return [key for key, source in self.sources.items() if slide_id in source.files]

    def scores(self, slide_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(coords, tumor logits) of one slide from one source; KeyError when that source has none."""
        return _read_scores(self.source(key).files[slide_id])

    def known_patch(self, slide_id: str, x: int, y: int) -> bool:
        """True when some source scored, or some round mined, a patch at (x, y): the only positions a patch
        thumbnail may show."""
        for key in self.sources_of(slide_id):
            coords, _ = self.scores(slide_id, key)
            if bool(((coords[:, 0] == x) & (coords[:, 1] == y)).any()):
                return True
        for round_ in self.rounds:
            table = self.selection(slide_id, round_)
            if len(table) and bool(((table["x"] == x) & (table["y"] == y)).any()):
                return True
        return False

    def patch_size_level0(self, slide_id: str) -> int:
        return _patch_size(self, slide_id)

    def selection(self, slide_id: str, round_: Round) -> pd.DataFrame:
        table = round_.selection
        return table[table["slide_id"].astype(str) == slide_id] if len(table) else table


@lru_cache(maxsize=256)
def _read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return read_patch_scores(path, "instance")


def _config_features(run: Path) -> list[Path]:
    """The features folder a run was trained or scored on, from its resolved LightningCLI config."""
    found = []
    for name in ("config.yaml", "config_predict.yaml"):
        path = run / name
        if path.is_file():
            try:
                features = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("features")
            except yaml.YAMLError:
                features = None
            # Relative paths in a resolved config are relative to where the run was started, or to the run.
            for folder in ([Path(features), run / features] if features else []):
                if folder.is_dir():
                    found.append(folder)
                    break
    return found


def _config_labels(run: Path) -> pd.DataFrame:
    path = run / "config.yaml"
    if not path.is_file():
        return pd.DataFrame()
    try:
        labels = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("labels")
    except yaml.YAMLError:
        return pd.DataFrame()
    if not labels or not Path(labels).is_file():
        return pd.DataFrame()
    table = pd.read_csv(labels, dtype={"slide_id": str})
    return table if "slide_id" in table.columns else pd.DataFrame()


def _patch_size(catalog: Catalog, slide_id: str) -> int:
    """The patch side in level-0 pixels: from the scores file, else the features store (ours, CLAM, TRIDENT)."""
    if slide_id in catalog.patch_sizes:
        return catalog.patch_sizes[slide_id]
    candidates = [catalog.source(k).files[slide_id] for k in catalog.sources_of(slide_id)]
    folders = [catalog.features_override] if catalog.features_override else []
    for key in catalog.sources_of(slide_id):
        folders += catalog.source(key).features
    for folder in folders:
        try:
            files = find_feature_files(folder)
        except InputError:
            continue
        if slide_id in files:
            candidates.append(files[slide_id])
    for path in candidates:
        size = _size_from_attrs(path, catalog.slides[slide_id].path)
        if size:
            catalog.patch_sizes[slide_id] = size
            return size
    raise InputError(f"{slide_id}: no patch size found in its patch scores or features store; pass the feature "
                     "folder the run used with --features")


def _size_from_attrs(path: Path, slide_path: Path) -> int | None:
    """``patch_size_level0``; or CLAM's ``patch_size`` at ``patch_level`` times that level's downsample."""
    attrs = {**read_attrs(path, "coords"), **_root_attrs(path)}
    if "patch_size_level0" in attrs:
        return int(round(float(attrs["patch_size_level0"])))
    if "patch_size" in attrs and "patch_level" in attrs:
        from features.slides import open_slide

        slide = open_slide(slide_path)
        try:
            downsample = slide.level_downsamples[int(attrs["patch_level"])]
        finally:
            slide.close()
        return int(round(float(attrs["patch_size"]) * downsample))
    return None


def _root_attrs(path: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as h5:
        return {k: v for k, v in h5.attrs.items() if k in {"patch_size_level0", "patch_size", "patch_level"}}


def _run_source(run: Path) -> Source:
    if not run.is_dir():
        raise InputError(f"--run {run}: run directory not found; pass the folder `mil test|predict` wrote")
    source = Source("run", f"run {run.name}", [run]).load()
    if not source.files:
        hint = f"; for a mining round pass {run / 'mil'} and --hnm {run.parent}" if ROUND_DIR.match(run.name) else ""
        raise InputError(f"--run {run}: no {PATCH_SCORES_DIR}/*.h5; run `mil test` or `mil predict` for this run "
                         f"first{hint}")
    return source


def _rounds(hnm: Path) -> list[Round]:
    if not hnm.is_dir():
        raise InputError(f"--hnm {hnm}: folder not found; pass the --out folder of `mil hnm`")
    found = sorted((int(m.group(1)), p) for p in hnm.iterdir() if p.is_dir() and (m := ROUND_DIR.match(p.name)))
    rounds = []
    for index, folder in found:
        source = Source(f"r{index}", f"round {index}", [RoundPaths(folder).reported, folder / "mil_train"]).load()
        if not source.files:
            continue
        selection = pd.DataFrame(columns=["slide_id", "x", "y", "kind", "score"])
        if (folder / "selection.csv").is_file():
            selection = pd.read_csv(folder / "selection.csv", dtype={"slide_id": str})
        quality_path = folder / "selection_quality.json"
        quality = json.loads(quality_path.read_text()) if quality_path.is_file() else {}
        rounds.append(Round(index, source, selection, quality))
    if not rounds:
        raise InputError(f"--hnm {hnm}: no round_<r>/mil*/patch_scores here; run `mil hnm` to the predict stage first")
    return rounds


def _threshold(run: Path) -> tuple[float, str]:
    """The slide threshold chosen on validation (Youden) when the run recorded one, else 0.5."""
    path = run / "metrics.json"
    if path.is_file():
        thresholds = json.loads(path.read_text()).get("slide", {}).get("thresholds", {})
        value = thresholds.get("youden_val")
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value), "Youden threshold chosen on validation (metrics.json)"
    return 0.5, "0.5 (the run recorded no validation threshold)"


def build_catalog(run: str | Path, slides: str | Path, annotations: str | Path | None = None,
                  hnm: str | Path | None = None, features: str | Path | None = None) -> Catalog:
    """Resolve every input, or raise :class:`InputError` naming the one that is wrong."""
    from features.slides import list_slides

    run = Path(run)
    sources = {"run": _run_source(run)}
    rounds = _rounds(Path(hnm)) if hnm else []
    sources.update({r.source.key: r.source for r in rounds})
    if annotations is not None and not Path(annotations).is_dir():
        raise InputError(f"--annotations {annotations}: folder not found; pass the folder of ASAP XML / GeoJSON files")
    if features is not None and not Path(features).is_dir():
        raise InputError(f"--features {features}: folder not found; pass the feature folder the run used")
    refs = {ref.slide_id: ref.path for ref in list_slides(slides)}
    scored = set().union(*(s.files for s in sources.values()))
    shown = sorted(set(refs) & scored)
    if not shown:
        raise InputError(f"--slides {slides}: none of its {len(refs)} slides has patch scores in --run {run}"
                         f"{' or --hnm ' + str(hnm) if hnm else ''}; pass the slides the run scored")
    missing = sorted(scored - set(refs))
    if missing:
        print(f"warning: {len(missing)} scored slides are not in --slides and are not shown (e.g. {missing[0]})")
    threshold, threshold_source = _threshold(run)
    labels = _config_labels(run)
    catalog_slides = {sid: _slide(sid, refs[sid], sources, labels, threshold) for sid in shown}
    return Catalog(catalog_slides, sources, rounds, Path(annotations) if annotations else None, threshold,
                   threshold_source, Path(features) if features else None)


def _slide(slide_id: str, path: Path, sources: dict[str, Source], labels: pd.DataFrame, threshold: float) -> Slide:
    """Label and split from the labels CSV (else the predictions); score from the run (else the latest round)."""
    label, split, score = "", "", None
    for source in [sources["run"], *reversed([s for k, s in sources.items() if k != "run"])]:
        table = source.predictions
        if len(table) and slide_id in set(table["slide_id"].astype(str)):
            row = table[table["slide_id"].astype(str) == slide_id].iloc[0]
            score = float(row["score"])
            label = str(row.get("label", ""))
            split = str(row.get("split", ""))
            break
    if len(labels) and slide_id in set(labels["slide_id"]):
        row = labels[labels["slide_id"] == slide_id].iloc[0]
        label = str(row.get("label", label))
        split = str(row.get("split", split)) if "split" in labels.columns else split
    prediction = "" if score is None else ("tumor" if score >= threshold else "normal")
    return Slide(slide_id, path, label, split, score, prediction)
