"""Provenance of a feature store: the settings that made a folder, recorded beside it and checked on reuse.

``features tile`` writes ``<out>/coords/settings.json``; ``features extract`` writes that and
``<out>/features/<tag>/settings.json``. A record is canonical JSON (see docs/features.md, "Provenance records"):
``settings`` holds what changes the numbers (geometry, tissue, encoder, views, dtype) under the command-line
names that set them, and is compared on every rerun; ``recorded`` holds what is worth knowing but must not block a
resume (library versions, device precision, time). A rerun with other settings stops before any slide is touched
and names each differing setting, old and new, and the fix; stores written before records existed are compared
through the attributes of one of their ``.h5`` files instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from features.errors import InputError

log = logging.getLogger(__name__)
FORMAT = "hnm-mil settings 1"
SETTINGS_NAME = "settings.json"
LOCK_DIR = ".locks"
# Transform keys that only describe how timm spelt the pipeline: they change with timm versions, not the pixels.
TRANSFORM_IGNORED = ("timm_transform",)


def settings_path(folder: str | Path) -> Path:
    return Path(folder) / SETTINGS_NAME


def lock_path(out: str | Path, *parts: str) -> Path:
    """A lock file under ``<out>/.locks/`` (kept out of the data folders, whose listings stay clean)."""
    path = Path(out) / LOCK_DIR / Path(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".lock")


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an OS file lock (released by the OS if the holder dies, so a kill never leaves it stuck)."""
    with FileLock(str(path)):
        yield


def canonical(value: Any) -> Any:
    """Plain JSON values with sorted keys; floats rounded so 0.5 read back from HDF5 equals 0.5 typed."""
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float):
        return round(value, 9) if math.isfinite(value) else str(value)
    if hasattr(value, "item"):  # numpy scalars
        return canonical(value.item())
    if isinstance(value, bytes):
        return value.decode()
    return value


def transform_settings(transform: Any) -> dict[str, Any]:
    """The part of a transform spec (dict or the JSON stored in attrs) that decides the pixels an encoder sees."""
    if isinstance(transform, str):
        try:
            transform = json.loads(transform) if transform else {}
        except json.JSONDecodeError:
            return {"raw": transform}
    return {k: v for k, v in dict(transform or {}).items() if k not in TRANSFORM_IGNORED}


# What every output records beside its settings (distribution names, as `pip show` spells them).
LIBRARIES = ("hnm-mil", "torch", "timm", "lightning", "torchmetrics", "numpy", "h5py", "jsonargparse", "scikit-learn")


SOURCE_TREE_VERSION = "0.0.0+source"


def package_version() -> str:
    """hnm-mil's version as installed, or ``0.0.0+source`` run from a source tree that was never installed.

    Read from the distribution, not ``features.__version__``: a tests/features folder on sys.path can shadow the
    package's ``__init__`` in test runs.
    """
    try:
        return metadata.version("hnm-mil")
    except metadata.PackageNotFoundError:
        return SOURCE_TREE_VERSION


def versions() -> dict[str, Any]:
    """Library versions, Python, the device and torch's thread count: the one record of what computed an output.

    The thread count is there because training's float sums, so trained weights, differ between 1 and 2 threads.
    """
    import torch

    found: dict[str, Any] = {}
    for name in LIBRARIES:
        try:
            found[name] = package_version() if name == "hnm-mil" else metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    found["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    found["torch_threads"] = torch.get_num_threads()
    return found


def make_record(kind: str, settings: Mapping[str, Any], recorded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"format": FORMAT, "kind": kind, "settings": canonical(settings),
            "recorded": canonical({**versions(), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   **dict(recorded or {})})}


def read_record(folder: str | Path) -> dict[str, Any] | None:
    path = settings_path(folder)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable settings record ({error}); delete it to adopt the files beside it, "
                         "or use another --out") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise InputError(f"{path}: not a settings record; delete it to adopt the files beside it, or use another --out")
    return record


def write_record(folder: str | Path, record: Mapping[str, Any]) -> Path:
    from features.store import atomic_path

    path = settings_path(folder)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, stored, wanted)`` for every setting both sides know and that differs."""
    stored, wanted = canonical(stored), canonical(wanted)
    return [(key, stored[key], wanted[key]) for key in sorted(set(stored) & set(wanted)) if stored[key] != wanted[key]]


def refuse_other_features(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], where: str,
                          made_from: str, fix: str) -> None:
    """One line when ``current`` feature settings differ from ``recorded`` ones (what a model or score came from).

    A model applied to features of another encoder of the same width runs without a word and means nothing, so
    whatever carries a model's or a score's feature settings is compared with the features it meets.
    """
    diffs = differences(recorded or {}, current)
    if diffs:
        shown = "; ".join(f"{key} {new!r} where {made_from} {old!r}" for key, old, new in diffs[:2])
        raise InputError(f"{where}: made with {shown}; {fix}")


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    def show(value: Any) -> str:
        return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)

    return "; ".join(f"--{key} {show(new)} (stored: {show(old)})" for key, old, new in diffs)


def check_folder(folder: str | Path, settings: Mapping[str, Any], legacy: Mapping[str, Any] | None,
                 overwrite: bool, what: str) -> list[tuple[str, Any, Any]]:
    """Compare ``settings`` with what made ``folder``; raise unless they agree or ``overwrite`` is set.

    ``legacy`` is the comparable subset read from an existing file's attributes, used when the folder has files
    but no record (stores written before records existed). Returns the differences (empty when they agree).
    """
    if not any(Path(folder).glob("*.h5")):
        return []  # nothing made with the old settings is left to protect
    record = read_record(folder)
    stored = record["settings"] if record else legacy
    if stored is None:
        return []
    diffs = differences(stored, settings)
    if diffs and not overwrite:
        raise InputError(f"{folder}: {what} were made with other settings: {describe(diffs)}; rerun with the stored "
                         "values, pass another --out, or --overwrite true to redo every slide with the new settings")
    return diffs


def remove_outputs(folder: str | Path) -> int:
    """Delete a folder's ``.h5`` files and record before it is redone with other settings (``--overwrite``).

    The record goes last, so a kill in between leaves a folder that still refuses the new settings without
    ``--overwrite`` and never one whose record describes files it does not hold.
    """
    folder = Path(folder)
    removed = 0
    for path in sorted(folder.glob("*.h5")):
        path.unlink(missing_ok=True)
        removed += 1
    settings_path(folder).unlink(missing_ok=True)
    return removed


def prepare_folder(out: str | Path, folder: str | Path, kind: str, settings: Mapping[str, Any],
                   legacy: Mapping[str, Any] | None, recorded: Mapping[str, Any], overwrite: bool, what: str,
                   write: bool = True) -> None:
    """Check ``folder`` against ``settings`` and (when ``write``) record them, under a lock shared by all runs.

    Other settings with ``overwrite``: the folder's files of the old kind are deleted first, so a store is never
    left holding files of both kinds, even if this run is killed half-way.
    """
    folder = Path(folder)
    with locked(lock_path(out, "settings", folder.relative_to(out).as_posix().replace("/", "_"))):
        diffs = check_folder(folder, settings, legacy, overwrite, what)
        if not write:
            return
        if diffs:
            removed = remove_outputs(folder)
            if removed:
                log.warning("%s: removed %d files made with other settings (--overwrite)", folder, removed)
        record = make_record(kind, settings, recorded)
        existing = read_record(folder)
        if existing is None or existing.get("settings") != record["settings"]:
            folder.mkdir(parents=True, exist_ok=True)
            write_record(folder, record)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process we may not signal still counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------- what each folder compares


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"tissue": {"use_otsu": True}}`` -> ``{"tissue.use_otsu": True}``: the command-line spelling."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and key not in {"encoder.model_kwargs", "encoder.transform"}:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def coords_source(opts: Any) -> str | None:
    return str(Path(opts.coords).resolve()) if getattr(opts, "coords", None) else None


def coords_settings(opts: Any) -> dict[str, Any]:
    """Settings that decide where patches go (``--mpp``, ``--patch_size``, overlap, tissue) or which are given."""
    from dataclasses import asdict

    given = coords_source(opts)
    settings: dict[str, Any] = {"mpp": float(opts.mpp), "patch_size": int(opts.patch_size),
                                "overlap": int(opts.overlap), "coords": given}
    if given is None:  # with given coordinates nothing is tiled, so tissue settings change nothing
        settings["min_tissue"] = float(opts.min_tissue)
        settings.update(flatten({"tissue": asdict(opts.tissue)}))
    return canonical(settings)


def features_settings(opts: Any, encoder: Any) -> dict[str, Any]:
    """Geometry plus everything about the encoder and its output: name, weights checksum, seed, transform."""
    settings = coords_settings(opts)
    settings.update({
        "encoder.name": encoder.config.name,
        "encoder.weights_sha256": encoder.weights_sha256,
        "encoder.seed": int(encoder.config.seed),
        "encoder.model_kwargs": dict(encoder.config.model_kwargs),
        "encoder.pooling": getattr(encoder.config, "pooling", "model"),
        "encoder.transform": transform_settings(encoder.transform_spec),
        "tta": opts.tta,
        "views": int(opts.views),
        "dtype": str(opts.dtype),
    })
    return canonical(settings)


def features_recorded(opts: Any, encoder: Any) -> dict[str, Any]:
    """Kept for the record and for ``features finetune``, never compared: a moved weights file is the same encoder."""
    weights = encoder.config.weights
    return {"encoder.weights": str(Path(weights).resolve()) if weights else "",
            "encoder.pretrained": bool(encoder.config.pretrained), "encoder.input_size": encoder.config.input_size,
            "encoder.hub": encoder.config.hub, "encoder.hub_file": encoder.config.hub_file,
            "encoder.tag": encoder.tag, "encoder.dim": int(encoder.dim), "precision": getattr(opts, "precision", "")}


def _json_attr(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value) if value else {}
        except json.JSONDecodeError:
            return value
    return value


def attrs_settings(coord_attrs: Mapping[str, Any], feature_attrs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The comparable settings one ``.h5`` file carries in its attributes (whatever of them it has)."""
    settings: dict[str, Any] = {}
    for name, attr in (("mpp", "target_mpp"), ("patch_size", "patch_size"), ("overlap", "overlap")):
        if attr in coord_attrs:
            settings[name] = coord_attrs[attr]
    feature_attrs = feature_attrs or {}
    for name, attr in (("encoder.name", "encoder"), ("encoder.weights_sha256", "weights_sha256"),
                       ("encoder.seed", "encoder_seed"), ("encoder.pooling", "pooling"), ("tta", "tta"),
                       ("views", "n_views"), ("dtype", "dtype")):
        if attr in feature_attrs:
            settings[name] = feature_attrs[attr]
    if "model_kwargs" in feature_attrs:
        settings["encoder.model_kwargs"] = _json_attr(feature_attrs["model_kwargs"])
    if "transform" in feature_attrs:
        settings["encoder.transform"] = transform_settings(feature_attrs["transform"])
    return canonical(settings)


def legacy_settings(folder: str | Path) -> dict[str, Any] | None:
    """Settings from the attributes of the first ``.h5`` file of a folder that has no record (older stores)."""
    from features.store import h5_files, read_attrs

    files = h5_files(Path(folder)) if Path(folder).is_dir() else []
    if not files:
        return None
    return attrs_settings(read_attrs(files[0], "coords"), read_attrs(files[0], "features"))


def prepare_tiling(opts: Any, write: bool = True) -> None:
    """``<out>/coords/``: refuse (or, with ``--overwrite``, clear) coordinates made with other tiling settings."""
    from features.store import COORDS_DIR

    folder = Path(opts.out) / COORDS_DIR
    prepare_folder(opts.out, folder, "coords", coords_settings(opts), legacy_settings(folder), {}, opts.overwrite,
                   "coordinates", write=write)


def prepare_extraction(opts: Any, encoder: Any, write: bool = True) -> None:
    """Before any slide is touched: check (and record) the coords folder this run tiles into and its tag folder."""
    from features.store import FEATURES_DIR

    if not opts.coords:
        prepare_tiling(opts, write=write)
    folder = Path(opts.out) / FEATURES_DIR / encoder.tag
    prepare_folder(opts.out, folder, "features", features_settings(opts, encoder), legacy_settings(folder),
                   features_recorded(opts, encoder), opts.overwrite, "features", write=write)


# ------------------------------------------------------------------------ the encoder a store was made with


def features_folders(store: str | Path) -> list[Path]:
    """Feature folders of a store root (``features/<tag>/``), or the folder itself when it holds features files."""
    from features.store import FEATURES_DIR, h5_files, read_attrs

    store = Path(store)
    if (store / FEATURES_DIR).is_dir():
        return sorted(p for p in (store / FEATURES_DIR).iterdir() if p.is_dir() and h5_files(p))
    files = h5_files(store) if store.is_dir() else []
    return [store] if files and read_attrs(files[0], "features") else []


def recorded_encoder(store: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The encoder behind a store's features: config fields plus ``weights_sha256``; None for coords-only stores.

    From the folder's record, or (older stores) from the attributes of its first features file. ``weights`` is a
    local file or None: hub weights come back as ``hub`` / ``hub_file``; ``pooling`` and the transform's
    ``mean`` / ``std`` / ``interpolation`` are what extraction used (``model`` and None where a store predates them).
    """
    from features.store import h5_files, read_attrs

    folders = features_folders(store)
    if not folders:
        return None
    if len(folders) > 1:
        names = ", ".join(p.name for p in folders)
        raise InputError(f"{store}: holds features of several encoders ({names}); pass --coords {Path(store)}/features/"
                         "<tag> to say which encoder to start from")
    folder = folders[0]
    record = read_record(folder)
    if record is not None and "encoder.name" in record["settings"]:
        settings, recorded = record["settings"], record.get("recorded", {})
        sha = str(settings.get("encoder.weights_sha256", "") or "")
        weights = recorded.get("encoder.weights") or None
        if "encoder.hub" in recorded:
            hub, hub_file = recorded.get("encoder.hub") or None, recorded.get("encoder.hub_file") or None
        elif weights:
            hub, hub_file = None, None
        else:  # a record written before hub sources were recorded: the files' `weights` attribute names them
            hub, hub_file = _hub_source(str(read_attrs(h5_files(folder)[0], "features").get("weights", "") or ""), sha)
        return {"name": settings["encoder.name"], "weights": weights,
                "pretrained": bool(recorded.get("encoder.pretrained", False)),
                "input_size": recorded.get("encoder.input_size"), "model_kwargs": settings.get("encoder.model_kwargs", {}),
                "seed": int(settings.get("encoder.seed", 0)), "weights_sha256": sha, "hub": hub, "hub_file": hub_file,
                "pooling": str(settings.get("encoder.pooling", "model")),
                **_normalisation(settings.get("encoder.transform", {}))}, folder
    attrs = read_attrs(h5_files(folder)[0], "features")
    if "encoder" not in attrs:
        return None  # a CLAM/TRIDENT folder says nothing about its encoder
    name, weights = str(attrs["encoder"]), str(attrs.get("weights", "") or "")
    sha = str(attrs.get("weights_sha256", "") or "")
    pretrained = bool(weights) and weights == name
    hub, hub_file = (None, None) if pretrained else _hub_source(weights, sha)
    local = None if pretrained or hub or not weights else weights
    return {"name": name, "weights": local, "pretrained": pretrained,
            "input_size": None, "model_kwargs": _json_attr(attrs.get("model_kwargs", "{}")) or {},
            "seed": int(attrs.get("encoder_seed", 0) or 0), "weights_sha256": sha, "hub": hub, "hub_file": hub_file,
            "pooling": str(attrs.get("pooling", "model") or "model"),
            **_normalisation(transform_settings(attrs.get("transform", "")))}, folder


def _hub_source(weights: str, sha: str) -> tuple[str | None, str | None]:
    """``(hub, hub_file)`` from a ``weights`` attribute ``hf-hub:<repo>`` or ``hf-hub:<repo>/<file>``.

    Timm's own hub loading records ``weights_sha256 = hf-hub:<repo>``; a fetched ``hub_file`` records the file's
    checksum, and then the repo is ``org/name`` (or, for the hub's few organisation-less repos, one part).
    """
    if not weights.startswith("hf-hub:"):
        return None, None
    source = weights.removeprefix("hf-hub:")
    if sha.startswith("hf-hub:"):
        return source, None
    parts = source.split("/")
    cut = 2 if len(parts) > 2 else 1
    return "/".join(parts[:cut]), "/".join(parts[cut:]) or None


def _normalisation(transform: Mapping[str, Any]) -> dict[str, Any]:
    """``input_size`` side, ``mean``, ``std`` and ``interpolation`` of a recorded transform (None where absent)."""
    transform = transform if isinstance(transform, Mapping) else {}
    size = transform.get("input_size")
    mean, std = transform.get("mean"), transform.get("std")
    return {"resolved_input_size": int(size[-1]) if isinstance(size, (list, tuple)) and size else None,
            "mean": [float(v) for v in mean] if isinstance(mean, (list, tuple)) and mean else None,
            "std": [float(v) for v in std] if isinstance(std, (list, tuple)) and std else None,
            "interpolation": str(transform["interpolation"]) if transform.get("interpolation") else None}
