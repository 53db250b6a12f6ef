"""The selection file: which patches mining chose, and as what.

``mil mine`` writes it; ``features finetune`` reads it. Columns (docs/formats.md): ``slide_id,x,y,pseudo_label,score,kind``
with ``kind`` in ``positive|hard_negative|negative``; ``x, y`` are level-0 top-left coordinates as in the store.
Extra columns (``truth``, ``round`` ...) are kept but never required.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from features.errors import InputError
from features.store import atomic_path, safe_slide_id

SELECTION_COLUMNS = ("slide_id", "x", "y", "pseudo_label", "score", "kind")
KINDS = ("positive", "hard_negative", "negative")


def write_selection(path: str | Path, table: pd.DataFrame) -> Path:
    """Validate and write a selection atomically."""
    table = validate_selection(table, str(path))
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)


def read_selection(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: selection file not found; run `mil mine` first")
    return validate_selection(pd.read_csv(path, dtype={"slide_id": str}), str(path))


def validate_selection(table: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in SELECTION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{source}: selection lacks columns {missing}; expected {','.join(SELECTION_COLUMNS)}")
    bad = sorted(set(table["kind"]) - set(KINDS))
    if bad:
        raise InputError(f"{source}: unknown kind(s) {bad}; use one of {', '.join(KINDS)}")
    table = table.copy()
    table["slide_id"] = [safe_slide_id(s, source) for s in table["slide_id"]]
    table[["x", "y"]] = table[["x", "y"]].astype("int64")
    table["pseudo_label"] = table["pseudo_label"].astype("int64")
    table["score"] = table["score"].astype("float64")
    ordered = list(SELECTION_COLUMNS) + [c for c in table.columns if c not in SELECTION_COLUMNS]
    return table[ordered]


def counts_by_kind(table: pd.DataFrame) -> dict[str, int]:
    return {kind: int((table["kind"] == kind).sum()) for kind in KINDS}
