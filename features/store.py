"""The feature store: one self-describing HDF5 file per slide, written atomically.

Layout (docs/formats.md): ``<out>/coords/<slide_id>.h5`` holds dataset ``coords`` (N, 2) int64, the top-left x, y
of each patch in level-0 pixels, with the tiling geometry as attributes; ``<out>/features/<tag>/<slide_id>.h5``
holds the same ``coords`` plus ``features`` (N, D) and optional ``features_views`` (V, N, D). Files are written
under a temporary name in the same folder and renamed when complete, so a file that exists is complete and a
crash never leaves a half-written one behind. The readers also accept CLAM ``h5_files/`` and TRIDENT
``features_*/`` folders, which use the same two dataset names.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from filelock import FileLock

from features.errors import InputError

COORDS_DIR = "coords"
FEATURES_DIR = "features"
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("slide_id", "status", "n_patches", "seconds", "error")
TMP_MARKER = ".tmp-"
# Temporaries are named ``<final>.tmp-<pid>-<random>-<host>`` so a run can tell its own in-flight files, another
# live run's and a killed run's apart; another machine's are left alone unless older than STALE_FOREIGN_SECONDS.
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TMP_NAME = re.compile(re.escape(TMP_MARKER) + r"(\d+)-[0-9a-f]+(?:-([0-9a-f]{8}))?$")
STALE_FOREIGN_SECONDS = 24 * 3600

# The geometry every coords dataset carries, so a features file alone can place its patches on the slide.
COORD_ATTRS = (
    "patch_size", "patch_size_level0", "patch_level", "downsample", "target_mpp",
    "mpp_level0", "mpp_source", "level0_width", "level0_height", "overlap",
)
FEATURE_ATTRS = ("encoder", "weights", "weights_sha256", "transform", "dtype", "hnm_mil_version")
# What a reader compares across the files of one folder (see features.provenance.attrs_settings).
COMPARED_COORD_ATTRS = ("target_mpp", "patch_size", "overlap")
COMPARED_FEATURE_ATTRS = ("encoder", "weights_sha256", "encoder_seed", "pooling", "tta", "n_views", "dtype",
                          "model_kwargs", "transform")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._\-+ ()\[\]]+$")


def safe_slide_id(slide_id: object, source: str = "slide list") -> str:
    """Return ``slide_id`` as a string that is safe as a file name; never lets a CSV write outside ``out``."""
    text = str(slide_id).strip()
    if not text or text in {".", ".."} or not _SAFE_ID.match(text) or text.startswith("."):
        raise InputError(
            f"{source}: slide_id {text!r} is not a plain file name; use letters, digits, '.', '_', '-' only "
            "(no '/' or '..')"
        )
    return text


def coords_path(out: str | Path, slide_id: str) -> Path:
    return Path(out) / COORDS_DIR / f"{safe_slide_id(slide_id)}.h5"


def features_path(out: str | Path, encoder_tag: str, slide_id: str) -> Path:
    return Path(out) / FEATURES_DIR / safe_slide_id(encoder_tag, "encoder tag") / f"{safe_slide_id(slide_id)}.h5"


def is_complete(path: str | Path) -> bool:
    """A store file is complete exactly when it exists under its final name (temporaries never are)."""
    return Path(path).is_file()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block finishes."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}-{HOST}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries left by killed runs; returns how many were removed.

    A temporary whose owner process still runs is another run's file in flight (two runs may share a store) and
    is left alone; so is one from another machine unless it is a day old.
    """
    removed = 0
    for tmp in Path(folder).rglob(f"*{TMP_MARKER}*"):
        if tmp.is_file() and temporary_is_stale(tmp):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def temporary_is_stale(path: Path) -> bool:
    """Whether the process that owns a temporary is gone (names without an owner count as stale)."""
    from features.provenance import pid_alive

    match = _TMP_NAME.search(path.name)
    if match is None:
        return True
    pid, host = int(match.group(1)), match.group(2)
    if host is not None and host != HOST:
        try:
            return time.time() - path.stat().st_mtime > STALE_FOREIGN_SECONDS
        except FileNotFoundError:
            return False
    return pid != os.getpid() and not pid_alive(pid)


def _set_attrs(target: h5py.AttributeManager, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if value is None:
            value = ""
        elif isinstance(value, (dict, list, tuple)) and not _is_numeric_sequence(value):
            value = json.dumps(value, sort_keys=True)
        target[key] = value


def _is_numeric_sequence(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value) and len(value) > 0


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _check_coords(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {coords.shape}")
    return coords.astype(np.int64, copy=False)


def grid_step(attrs: Mapping[str, Any]) -> int | None:
    """The level-0 distance between neighbouring patches (the tiling stride), or None without full geometry.

    ``round((patch_size - overlap) * target_mpp / mpp_level0)``: the one rule that places the grid, so that
    ``coords // grid_step`` is each patch's (column, row) and graph models find neighbours one step apart.
    """
    try:
        step = (float(attrs["patch_size"]) - float(attrs.get("overlap", 0))) * float(attrs["target_mpp"])
        return max(1, round(step / float(attrs["mpp_level0"])))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _write_grid(h5: h5py.File, coords: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """``grid`` (N, 2): each patch's (column, row) on the tiling grid, beside the level-0 ``coords``."""
    step = grid_step(attrs)
    if step is not None and len(coords) and not (coords % step).any():  # free-placed patches have no grid
        h5.create_dataset("grid", data=coords // step).attrs["grid_step_level0"] = step


def write_coords(path: str | Path, coords: np.ndarray, attrs: Mapping[str, Any]) -> Path:
    """Write a coords-only file (``features tile``)."""
    coords = _check_coords(coords)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        _set_attrs(h5.create_dataset("coords", data=coords).attrs, attrs)
        _write_grid(h5, coords, attrs)
    return Path(path)


def write_features(
    path: str | Path,
    coords: np.ndarray,
    coord_attrs: Mapping[str, Any],
    features: np.ndarray,
    feature_attrs: Mapping[str, Any],
    views: np.ndarray | None = None,
) -> Path:
    """Write a self-contained features file; row i of ``features`` (and of each view) belongs to ``coords[i]``."""
    coords = _check_coords(coords)
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != coords.shape[0]:
        raise ValueError(f"features {features.shape} do not match coords {coords.shape}")
    if views is not None and (views.ndim != 3 or views.shape[1:] != features.shape):
        raise ValueError(f"features_views {views.shape} must be (V, {features.shape[0]}, {features.shape[1]})")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        _set_attrs(h5.create_dataset("coords", data=coords).attrs, coord_attrs)
        _write_grid(h5, coords, coord_attrs)
        dset = h5.create_dataset("features", data=features, chunks=_row_chunks(features.shape))
        _set_attrs(dset.attrs, {"dtype": str(features.dtype), **feature_attrs})
        if views is not None:
            h5.create_dataset("features_views", data=views.astype(features.dtype, copy=False))
    return Path(path)


def _row_chunks(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """Chunk by rows so that a random patch subset (training caps) reads little; None for empty datasets."""
    if shape[0] == 0:
        return None
    return (min(shape[0], 1024), shape[1])


@dataclass
class FeatureBag:
    """What one slide's features file holds, whatever tool wrote it."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    coord_attrs: dict[str, Any] = field(default_factory=dict)
    feature_attrs: dict[str, Any] = field(default_factory=dict)
    views: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


def read_attrs(path: str | Path, dataset: str = "coords") -> dict[str, Any]:
    with h5py.File(path, "r") as h5:
        return {key: _plain(value) for key, value in h5[dataset].attrs.items()} if dataset in h5 else {}


def read_coords(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinates and geometry from a coords or features file."""
    try:
        with h5py.File(path, "r") as h5:
            coords = np.asarray(h5["coords"][:], dtype=np.int64).reshape(-1, 2)
            attrs = {key: _plain(value) for key, value in h5["coords"].attrs.items()}
    except (OSError, KeyError) as error:
        raise InputError(f"{path}: not a readable coords file ({error}); delete it and rerun `features tile`")
    return coords, attrs


def read_bag(path: str | Path, slide_id: str | None = None, rows: np.ndarray | None = None,
             with_views: bool = False) -> FeatureBag:
    """Read one slide's features (optionally a sorted subset of rows) from our, CLAM's or TRIDENT's layout."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            if "features" not in h5:
                raise InputError(f"{path}: has no 'features' dataset; is this a coords-only file? run `features extract`")
            dset = h5["features"]
            squeeze = dset.ndim == 3 and dset.shape[0] == 1  # some tools store (1, N, D)
            index = slice(None) if rows is None else np.sort(np.asarray(rows))
            features = dset[0][index] if squeeze else dset[index]
            coords = h5["coords"][index] if "coords" in h5 else np.zeros((len(features), 2), dtype=np.int64)
            views = None
            if with_views and "features_views" in h5:
                views = h5["features_views"][:, index] if rows is not None else h5["features_views"][:]
            coord_attrs = {k: _plain(v) for k, v in h5["coords"].attrs.items()} if "coords" in h5 else {}
            feature_attrs = {k: _plain(v) for k, v in dset.attrs.items()}
    except OSError as error:
        raise InputError(f"{path}: cannot read HDF5 ({error}); delete the file and rerun extraction")
    return FeatureBag(
        slide_id=slide_id or path.stem,
        features=np.asarray(features).reshape(len(features), features.shape[-1] if features.ndim > 1 else -1),
        coords=np.asarray(coords, dtype=np.int64).reshape(-1, 2),
        coord_attrs=coord_attrs,
        feature_attrs=feature_attrs,
        views=views,
    )


def rows_at(coords: np.ndarray, wanted: np.ndarray, source: str | Path, fix: str) -> np.ndarray:
    """Row of each ``wanted`` (x, y) in a file's ``coords``: features are joined on position, never on order."""
    wanted = np.asarray(wanted, dtype=np.int64).reshape(-1, 2)
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(np.asarray(coords).reshape(-1, 2))}
    found = np.array([lookup.get((int(x), int(y)), -1) for x, y in wanted], dtype=np.int64)
    if (found < 0).any():
        x, y = wanted[np.argmax(found < 0)]
        raise InputError(f"{source}: no patch at x={x}, y={y}; {fix}")
    return found


def count_patches(path: str | Path) -> int:
    with h5py.File(path, "r") as h5:
        dset = h5["features"] if "features" in h5 else h5["coords"]
        return int(dset.shape[1] if dset.ndim == 3 and dset.shape[0] == 1 else dset.shape[0])


def find_feature_files(folder: str | Path, check: bool = True) -> dict[str, Path]:
    """Map slide_id -> features file for our store, a CLAM results folder or a TRIDENT features folder.

    Accepted: a folder of ``*.h5`` files (``<out>/features/<tag>/``, CLAM ``h5_files/``, TRIDENT
    ``features_<encoder>/``), or a parent holding exactly one of those. With ``check`` every file's recorded
    settings must agree (:func:`check_same_settings`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: feature folder not found; pass the folder `features extract` wrote")
    candidates = [folder, folder / "h5_files"]
    features_root = folder / FEATURES_DIR
    if features_root.is_dir():
        candidates += sorted(p for p in features_root.iterdir() if p.is_dir())
    candidates += sorted(p for p in folder.glob("features_*") if p.is_dir())
    found = [c for c in candidates if c.is_dir() and h5_files(c)]
    if not found:
        raise InputError(f"{folder}: no .h5 feature files here or in h5_files/, features/<tag>/ or features_*/")
    if len(found) > 1 and found[0] != folder:
        names = ", ".join(str(f) for f in found)
        raise InputError(f"{folder}: several feature folders ({names}); pass the one to use")
    files = {p.stem: p for p in h5_files(found[0])}
    if check:
        check_same_settings(files.values())
    return files


def file_settings(path: Path) -> dict[str, Any]:
    """The settings a features file records in its attributes (attributes only: no data is read)."""
    from features.provenance import attrs_settings

    def wanted(attrs: h5py.AttributeManager, names: tuple[str, ...]) -> dict[str, Any]:
        present = set(attrs.keys())
        return {name: _plain(attrs[name]) for name in names if name in present}

    try:
        with h5py.File(path, "r") as h5:
            coord_attrs = wanted(h5["coords"].attrs, COMPARED_COORD_ATTRS) if "coords" in h5 else {}
            feature_attrs = wanted(h5["features"].attrs, COMPARED_FEATURE_ATTRS) if "features" in h5 else {}
            if "features" in h5 and "dtype" not in feature_attrs:
                feature_attrs["dtype"] = str(h5["features"].dtype)
    except OSError as error:
        raise InputError(f"{path}: cannot read HDF5 ({error}); delete the file and rerun extraction") from None
    return attrs_settings(coord_attrs, feature_attrs)


def check_same_settings(paths: Iterable[Path]) -> dict[str, Any] | None:
    """Refuse a feature folder whose files were made with different encoders, checksums, transforms or geometry;
    return the settings they share (None for no file).

    Bags from two encoders of one dimension would train without a word and mean nothing; CLAM/TRIDENT files
    without these attributes compare only on what they carry (the stored ``dtype``).
    """
    from features.provenance import differences

    first: tuple[Path, dict[str, Any]] | None = None
    for path in paths:
        settings = file_settings(path)
        if first is None:
            first = (path, settings)
            continue
        diffs = differences(first[1], settings)
        if diffs:
            shown = "; ".join(f"{key}: {old!r} vs {new!r}" for key, old, new in diffs[:3])
            raise InputError(f"{path.parent}: files were made with different settings ({shown}: {first[0].name} vs "
                             f"{path.name}); keep one extraction per folder: rerun `features extract` with one setting "
                             "into a new --out")
    return None if first is None else first[1]


def folder_settings(folder: str | Path) -> dict[str, Any]:
    """The settings a feature folder's files share (checked to agree): what a model or score made from it records."""
    return check_same_settings(find_feature_files(folder, check=False).values()) or {}


def h5_files(folder: Path) -> list[Path]:
    """Complete ``.h5`` files of a folder, sorted; temporaries of unfinished writes are never listed."""
    return sorted(p for p in folder.glob("*.h5") if TMP_MARKER not in p.name)


class Manifest:
    """``<out>/manifest.csv``: one row per slide, rewritten atomically after each slide so it survives a kill.

    Two runs may share a store: each save happens under a file lock and folds in the rows other writers saved
    since, so no writer drops another's rows; for the slides this object recorded, its own rows win.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict[str, str]] = self._read()
        self.mine: set[str] = set()

    def _read(self) -> dict[str, dict[str, str]]:
        rows: dict[str, dict[str, str]] = {}
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                for row in csv.DictReader(handle):
                    rows[row["slide_id"]] = {k: row.get(k) or "" for k in MANIFEST_COLUMNS}
        return rows

    @property
    def lock_path(self) -> Path:
        folder = self.path.parent / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{self.path.name}.lock"

    def update(self, row: Mapping[str, str]) -> None:
        """Set one slide's row (saved with the next :meth:`save`)."""
        slide_id = row["slide_id"]
        self.rows[slide_id] = {k: row.get(k) or "" for k in MANIFEST_COLUMNS}
        self.mine.add(slide_id)

    def record(self, slide_id: str, status: str, n_patches: int | None = None, seconds: float | None = None,
               error: str = "") -> None:
        self.update({
            "slide_id": slide_id,
            "status": status,
            "n_patches": "" if n_patches is None else str(int(n_patches)),
            "seconds": "" if seconds is None else f"{seconds:.3f}",
            "error": error.replace("\n", " "),
        })
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path)):
            self.rows = {**self.rows, **self._read(), **{k: self.rows[k] for k in self.mine}}
            with atomic_path(self.path) as tmp, tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows[k] for k in sorted(self.rows))
