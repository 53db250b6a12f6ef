"""The labels CSV: one row per slide, ``slide_id,label`` plus optional ``case_id``, ``site`` and split columns.

Splits come either from one ``split`` column (``train|val|test``) or from ``fold_0..fold_K`` columns holding the
same words, one column per fold. Labels are integers or strings mapped by ``label_map``; the default binary map
sends normal/negative to 0 and tumor/positive to 1 so that class 0 is always "no tumor". Every check here fails
with one line naming the CSV, because a bad label file otherwise surfaces as a confusing error mid-training.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from features.errors import InputError
from features.store import safe_slide_id

DEFAULT_LABEL_MAP: dict[str, int] = {"normal": 0, "negative": 0, "tumor": 1, "tumor": 1, "positive": 1}
SPLITS = ("train", "val", "test")


def read_labels(path: str | Path, label_map: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Read and check a labels CSV; returns a frame indexed by ``slide_id`` with an integer ``label`` column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: labels CSV not found; pass --data.labels with a slide_id,label CSV")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable CSV ({error}); write it as slide_id,label[,case_id,split]")
    frame.columns = [c.strip() for c in frame.columns]
    missing = {"slide_id", "label"} - set(frame.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))}; the labels CSV needs slide_id,label")
    frame["slide_id"] = [safe_slide_id(s, str(path)) for s in frame["slide_id"]]
    duplicated = frame["slide_id"][frame["slide_id"].duplicated()].unique().tolist()
    if duplicated:
        raise InputError(f"{path}: slide_id repeated ({_few(duplicated)}); keep one row per slide")
    frame["label"] = encode_labels(frame["label"], label_map, path)
    for column in split_columns(frame):
        values = frame[column].str.strip().str.lower()
        bad = sorted(set(values) - set(SPLITS) - {""})
        if bad:
            raise InputError(f"{path}: column {column} holds {_few(bad)}; use train, val or test")
        frame[column] = values
    if "case_id" in frame.columns:
        frame["case_id"] = frame["case_id"].where(frame["case_id"].str.strip() != "", frame["slide_id"])
    return frame.set_index("slide_id", drop=False)


def encode_labels(values: pd.Series, label_map: Mapping[str, int] | None, path: str | Path) -> pd.Series:
    """Integers pass through; strings go through ``label_map`` (case-insensitive) or the default binary map."""
    text = values.astype(str).str.strip()
    if (text == "").any():
        rows = [str(i + 2) for i in text.index[text == ""][:5]]
        raise InputError(f"{path}: empty label on line(s) {', '.join(rows)}; give every slide a label")
    if text.str.fullmatch(r"-?\d+").all():
        labels = text.astype(int)
    else:
        mapping = {str(k).strip().lower(): int(v) for k, v in (label_map or DEFAULT_LABEL_MAP).items()}
        unknown = sorted(set(text.str.lower()) - set(mapping) - {str(v) for v in mapping.values()})
        if unknown:
            raise InputError(
                f"{path}: unknown label(s) {_few(unknown)}; map them with --data.label_map "
                f"(known: {', '.join(sorted(mapping))})"
            )
        labels = text.str.lower().map(lambda t: mapping.get(t, int(t) if t.lstrip("-").isdigit() else -1))
    if (labels < 0).any():
        raise InputError(f"{path}: negative class index; labels must be 0..C-1")
    return labels.astype(int)


def split_columns(frame: pd.DataFrame) -> list[str]:
    """The split columns present: ``split`` and/or ``fold_0..fold_K`` in fold order."""
    folds = sorted((c for c in frame.columns if c.startswith("fold_") and c[5:].isdigit()), key=lambda c: int(c[5:]))
    return (["split"] if "split" in frame.columns else []) + folds


def split_of(frame: pd.DataFrame, fold: int | None, path: str | Path) -> pd.Series:
    """The train/val/test assignment for ``fold`` (None = the ``split`` column)."""
    column = "split" if fold is None else f"fold_{fold}"
    if column not in frame.columns:
        have = ", ".join(split_columns(frame)) or "none"
        hint = "run `mil split` to add one" if not split_columns(frame) else f"split columns present: {have}"
        raise InputError(f"{path}: no {column!r} column for --data.fold {fold}; {hint}")
    empty = frame.index[frame[column] == ""].tolist()
    if empty:  # an empty cell would silently leave the slide out of every split
        lines = [str(frame.index.get_loc(s) + 2) for s in empty]
        raise InputError(f"{path}: empty {column} cell on line(s) {_few(lines)} (slide {_few(empty)}); write train, "
                         "val or test there, or delete the row to leave the slide out")
    return frame[column]


def check_classes(labels: pd.Series, split: str, path: str | Path, num_classes: int) -> None:
    """A split that trains or selects a model needs every class, or AUC and the loss are meaningless."""
    present = sorted(set(labels.tolist()))
    if len(present) < min(2, num_classes):
        raise InputError(
            f"{path}: the {split} split holds only class {present} ({len(labels)} slides); "
            "every split needs both classes — rerun `mil split` or choose another fold"
        )


def match_features(frame: pd.DataFrame, files: Mapping[str, Path], path: str | Path, features: str | Path,
                   drop_missing: bool = False) -> pd.DataFrame:
    """Keep labelled slides that have a features file; slides with features but no label are skipped."""
    missing = [s for s in frame.index if s not in files]
    if missing and not drop_missing:
        raise InputError(
            f"{path}: {len(missing)} labelled slide(s) have no features in {features} ({_few(missing)}); "
            "extract them, or pass --data.drop_missing true to skip them"
        )
    if missing:
        warnings.warn(f"{path}: skipping {len(missing)} labelled slide(s) without features ({_few(missing)})",
                      stacklevel=2)
    unlabelled = sorted(set(files) - set(frame.index))
    if unlabelled:
        warnings.warn(f"{features}: {len(unlabelled)} feature file(s) have no label in {path} ({_few(unlabelled)}); "
                      "they are not used", stacklevel=2)
    kept = frame.drop(index=missing)
    if kept.empty:
        raise InputError(f"{path}: no labelled slide has features in {features}; check the slide_id column")
    return kept


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f", ... (+{len(items) - n})" if len(items) > n else "")
