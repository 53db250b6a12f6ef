"""Splits and folds for the labels CSV, and ``mil split``.

Three ways to get them, each written back as columns of a copy of the labels CSV:

- ``holdout`` (Camelyon16 style): slides already marked ``test`` stay the test set; a stratified, seeded
  validation set is carved from the rest (grouped by ``case_id`` when present).
- ``kfold`` (TCGA style): ``StratifiedGroupKFold`` over ``case_id`` gives K test folds; within the other K-1
  folds a grouped, stratified validation set is carved. Columns ``fold_0..fold_{K-1}``. Grouping by case means
  two slides of one patient never sit on both sides of a split.
- ``clam``: CLAM's ``splits_<k>.csv`` files (columns train, val, test listing slide ids) become ``fold_<k>``.

``--group_by site`` makes the folds site-preserved instead: no tissue-source site on both sides of a split, so a
model cannot score well by recognising a hospital's stain or scanner (Howard et al., Nat. Commun. 2021). TCGA slide
ids (``TCGA-XX-XXXX-...``) carry both: the patient is ``TCGA-XX-XXXX``, the site is ``XX``; when every slide id is
a TCGA barcode, missing ``case_id`` and ``site`` columns are derived from it and written out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from features.errors import InputError
from features.store import atomic_path
from mil.data.labels import read_labels, split_columns


TCGA_BARCODE = re.compile(r"^(TCGA-([A-Z0-9]{2})-[A-Z0-9]{4})(?:-|$)", re.IGNORECASE)
GROUPS = {"case": "cases", "site": "sites"}


def tcga_ids(slide_id: str) -> tuple[str, str] | None:
    """(patient ``TCGA-XX-XXXX``, tissue-source site ``XX``) of a TCGA barcode, or None for other ids."""
    match = TCGA_BARCODE.match(slide_id.strip())
    return (match.group(1).upper(), match.group(2).upper()) if match else None


def with_tcga_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill missing ``case_id`` / ``site`` columns from TCGA barcodes when every slide id is one."""
    ids = [tcga_ids(s) for s in frame["slide_id"]]
    if not ids or any(i is None for i in ids):
        return frame
    frame = frame.copy()
    if "case_id" not in frame.columns:
        frame["case_id"] = [i[0] for i in ids]
    if "site" not in frame.columns:
        frame["site"] = [i[1] for i in ids]
    return frame


def groups_of(frame: pd.DataFrame, by: str = "case") -> np.ndarray:
    """Sites (``by='site'``), or patients when known, else each slide is its own group."""
    if by == "site":
        if "site" not in frame.columns:
            raise InputError("--group_by site needs a site column in the labels CSV (or TCGA barcodes as slide ids)")
        return frame["site"].to_numpy()
    return (frame["case_id"] if "case_id" in frame.columns else frame["slide_id"]).to_numpy()


def carve_validation(frame: pd.DataFrame, val_fraction: float, seed: int, by: str = "case") -> pd.Index:
    """Slide ids of a stratified, grouped (case or site) validation subset of ``frame``."""
    n_splits = max(2, round(1 / val_fraction))
    n_groups = len(set(groups_of(frame, by)))
    if n_groups < n_splits:
        raise InputError(f"only {n_groups} {GROUPS[by]} to carve a validation set of {val_fraction:.0%}; "
                         "raise --val_fraction")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_rows = next(splitter.split(frame, frame["label"], groups_of(frame, by)))
    return frame.index[val_rows]


def holdout_split(frame: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0, by: str = "case") -> pd.Series:
    """Keep existing ``test`` rows; split the rest into train and a stratified validation set."""
    existing = frame["split"] if "split" in frame.columns else pd.Series("", index=frame.index)
    split = pd.Series("train", index=frame.index)
    split[existing == "test"] = "test"
    development = frame[split == "train"]
    split[carve_validation(development, val_fraction, seed, by)] = "val"
    return split


def kfold_splits(frame: pd.DataFrame, k: int = 5, val_fraction: float = 0.1, seed: int = 0,
                 by: str = "case") -> pd.DataFrame:
    """``fold_i`` columns: fold i is the test set; validation is carved from the other folds."""
    n_groups = len(set(groups_of(frame, by)))
    if n_groups < k:
        raise InputError(f"{n_groups} {GROUPS[by]} cannot make {k} folds; lower --k")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    columns = {}
    for fold, (_, test_rows) in enumerate(splitter.split(frame, frame["label"], groups_of(frame, by))):
        split = pd.Series("train", index=frame.index)
        split.iloc[test_rows] = "test"
        split[carve_validation(frame[split == "train"], val_fraction, seed + fold, by)] = "val"
        columns[f"fold_{fold}"] = split
    return pd.DataFrame(columns)


def clam_splits(frame: pd.DataFrame, files: list[str | Path]) -> pd.DataFrame:
    """Turn CLAM ``splits_<k>.csv`` files (columns train,val,test of slide ids) into ``fold_<k>`` columns."""
    columns = {}
    for fold, file in enumerate(sorted(map(Path, files), key=_fold_number)):
        table = pd.read_csv(file, dtype=str)
        if not {"train", "val", "test"} <= set(table.columns):
            raise InputError(f"{file}: not a CLAM splits file; it needs train, val and test columns")
        split = pd.Series("", index=frame.index)
        for name in ("train", "val", "test"):
            ids = [s.strip() for s in table[name].dropna() if s.strip()]
            unknown = [s for s in ids if s not in frame.index]
            if unknown:
                raise InputError(f"{file}: slide(s) {', '.join(unknown[:5])} are not in the labels CSV; use the "
                                 "labels file these splits were made for")
            split[ids] = name
        columns[f"fold_{fold}"] = split
    return pd.DataFrame(columns)


def _fold_number(path: Path) -> int:
    digits = "".join(c for c in path.stem.rsplit("_", 1)[-1] if c.isdigit())
    return int(digits) if digits else 0


def check_no_leak(frame: pd.DataFrame, columns: list[str], by: str = "case") -> None:
    """Fail if any case (or site) has slides in two different splits of one column (an internal guarantee)."""
    groups = groups_of(frame, by)
    for column in columns:
        per_group = pd.Series(frame[column].to_numpy()).groupby(groups).nunique()
        if (per_group > 1).any():
            raise InputError(f"{column}: {GROUPS[by]} {', '.join(map(str, per_group.index[per_group > 1][:5]))} "
                             "span several splits")


@dataclass
class SplitOptions:
    """Options of ``mil split``."""

    labels: str
    """Labels CSV (slide_id,label[,case_id,split])."""
    out: str
    """Where to write the labels CSV with the added split/fold columns."""
    mode: Literal["holdout", "kfold", "clam"] = "kfold"
    """holdout: keep test rows, carve validation; kfold: K grouped, stratified folds; clam: import CLAM splits."""
    k: int = 5
    """Number of folds (kfold)."""
    val_fraction: float = 0.1
    """Share of the development slides used for validation (holdout, kfold)."""
    seed: int = 0
    """Seed of the shuffled, stratified group folds."""
    clam: list[str] | None = None
    """CLAM splits_<k>.csv files (clam)."""
    group_by: Literal["case", "site"] = "case"
    """case: a patient's slides stay on one side of every split; site: site-preserved folds, no tissue-source site
    on both sides (the site column, or XX of TCGA-XX-XXXX slide ids)."""


def make_splits(options: SplitOptions) -> Path:
    """Write a copy of the labels CSV (labels as given) with the new split or fold columns."""
    frame = with_tcga_ids(read_labels(options.labels))
    by = options.group_by
    if options.mode == "holdout":
        added = pd.DataFrame({"split": holdout_split(frame, options.val_fraction, options.seed, by)})
    elif options.mode == "kfold":
        added = kfold_splits(frame, options.k, options.val_fraction, options.seed, by)
    else:
        if not options.clam:
            raise InputError("mil split --mode clam needs --clam splits_0.csv [splits_1.csv ...]")
        added = clam_splits(frame, options.clam)
    if options.mode != "clam":
        known = [c for c in ("case_id", "site") if c in frame]
        check_no_leak(pd.concat([frame[["slide_id", "label"] + known], added], axis=1), list(added.columns), by)
    raw = pd.read_csv(options.labels, dtype=str, keep_default_na=False)
    raw.columns = [c.strip() for c in raw.columns]
    raw = raw.drop(columns=split_columns(raw))
    for column in ("case_id", "site"):  # derived from TCGA barcodes: written so later stages group alike
        if column in frame and column not in raw:
            raw[column] = frame[column].to_numpy()
    out_frame = pd.concat([raw.reset_index(drop=True), added.reset_index(drop=True)], axis=1)
    out = Path(options.out)
    with atomic_path(out) as tmp:
        out_frame.to_csv(tmp, index=False)
    return out


def main(argv: list[str]) -> None:
    """``mil split``: write stratified / case-grouped folds, or import CLAM splits."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mil split", description=main.__doc__)
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(SplitOptions, as_positional=False)
    options = SplitOptions(**{k: v for k, v in vars(parser.parse_args(argv)).items() if k != "config"})
    out = make_splits(options)
    table = pd.read_csv(out)
    for column in split_columns(table):
        counts = table.groupby([column, "label"]).size().unstack(fill_value=0)
        print(f"{column}: " + "; ".join(f"{s} {({k: int(v) for k, v in counts.loc[s].items()})}" for s in counts.index))
    print(f"wrote {out}")
