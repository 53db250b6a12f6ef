"""What a loop folder was made with, and the refusal to mix settings in one folder.

``<out>/hnm_config.yaml`` is the loop's resolved config (runnable: ``mil hnm --config <out>/hnm_config.yaml``
resumes the loop) and ``<out>/hnm_inputs.json`` holds content hashes of the files it names: labels CSV, slides
CSV (or the slide folder's file names and sizes), annotations, MIL config and starting encoder weights. A rerun
into a folder made with other settings or other input contents is refused in one line naming the setting; paths
themselves are compared by content, so a moved cohort still resumes. Every stage marker records the same for its
own stage (see ``Stages`` in :mod:`mil.mining.loop`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from features.errors import InputError
from features.store import atomic_path
from mil.mining.settings import HNMArgs
from mil.training.command import dotted

CONFIG_NAME = "hnm_config.yaml"
INPUTS_NAME = "hnm_inputs.json"
SUMMARY_NAME = "hnm_summary.csv"
ROUND_DIR = re.compile(r"round_\d+")
# Settings that may change between reruns of one folder: how far to go, where it is, and the overwrite switch.
FREE = {"rounds", "out", "overwrite"}
# Settings that name files: compared by the content hash in hnm_inputs.json, not by their spelling.
FILES = ("cohort.slides", "cohort.labels", "cohort.annotations", "mil_config", "encoder.weights")
FIX = "use a new --out, or --overwrite true to discard that folder's rounds and start over"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """First 12 hex digits of a sha256 over the ``features`` and ``mil`` sources: the code a stage ran with.

    The package version alone does not change while the code is edited or installed from a checkout.
    """
    import features
    import mil

    digest = hashlib.sha256()
    for package in (features, mil):
        root = Path(package.__file__).parent
        for file in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{file.relative_to(root).as_posix()}".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def fingerprint(path: str | None, contents: bool = True) -> str | None:
    """sha256 of a file, or of a folder's files (their contents, or only names and sizes for slides)."""
    if path is None:
        return None
    root = Path(path)
    if root.is_file():
        return sha256(root)
    if not root.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(sha256(file).encode() if contents else str(file.stat().st_size).encode())
    return digest.hexdigest()


def resolved(args: HNMArgs) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(args), default=str))


def input_hashes(args: HNMArgs) -> dict[str, str | None]:
    return {
        "cohort.slides": fingerprint(args.cohort.slides, contents=False),
        "cohort.labels": fingerprint(args.cohort.labels),
        "cohort.annotations": fingerprint(args.cohort.annotations),
        "mil_config": fingerprint(args.mil_config),
        "encoder.weights": fingerprint(args.encoder.weights),
    }


def default_settings(cls: type) -> dict[str, Any]:
    """The defaults of a settings dataclass, nested as ``asdict`` nests them (fields without a default left out)."""
    found: dict[str, Any] = {}
    for item in fields(cls):
        if item.default is not MISSING:
            value = item.default
        elif item.default_factory is not MISSING:
            value = item.default_factory()
        else:
            continue
        found[item.name] = asdict(value) if is_dataclass(value) else value
    return json.loads(json.dumps(found, default=str))


def first_difference(before: Mapping[str, Any], now: Mapping[str, Any],
                     defaults: Mapping[str, Any] | None = None) -> tuple[str, Any, Any] | None:
    """The first dotted key whose value differs (a key present on one side only counts).

    A key of ``defaults`` that ``before`` lacks and ``now`` holds at its default is no difference: the setting
    was added after the record was written, and a new setting's default keeps what the code did before it.
    """
    old, new = dotted(before, leaves=()), dotted(now, leaves=())
    added = dotted(defaults or {}, leaves=())
    for key in sorted(set(old) | set(new)):
        if key not in old and key in added and new.get(key) == added[key]:
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            return key, old.get(key, "<absent>"), new.get(key, "<absent>")
    return None


def comparable(config: Mapping[str, Any], hashes: Mapping[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in dotted(config, leaves=()).items() if k.split(".")[0] not in FREE and k not in FILES}
    flat.update({f"{key} (content)": value for key, value in hashes.items()})
    return flat


def earlier_outputs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    names = {CONFIG_NAME, INPUTS_NAME, SUMMARY_NAME}
    return sorted(p for p in out.iterdir() if p.name in names or (p.is_dir() and ROUND_DIR.fullmatch(p.name)))


def prepare_folder(args: HNMArgs) -> None:
    """Check ``--out`` against the settings it was made with (or clear it with ``--overwrite``); record ours."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; pass a folder for the loop's rounds")
    config, hashes = {**resolved(args), "overwrite": False}, input_hashes(args)
    earlier = earlier_outputs(out)
    if args.overwrite:
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif (out / CONFIG_NAME).is_file():
        before = yaml.safe_load((out / CONFIG_NAME).read_text()) or {}
        stored = json.loads((out / INPUTS_NAME).read_text()) if (out / INPUTS_NAME).is_file() else {}
        difference = first_difference(comparable(before, stored), comparable(config, hashes),
                                      comparable(default_settings(HNMArgs), {}))
        if difference:
            key, old, new = difference
            what = (f"the content of {key.removesuffix(' (content)')} changed" if key.endswith("(content)")
                    else f"{key} was {old!r}, now {new!r}")
            raise InputError(f"{out}: was made with other settings ({what}); {FIX}")
    elif any(p.is_dir() for p in earlier):
        raise InputError(f"{out}: holds loop rounds but no {CONFIG_NAME} saying what made them; {FIX}")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text("# `mil hnm` settings this folder was made with (rerun: mil hnm --config this file)\n"
                       + yaml.safe_dump(config, sort_keys=False))
    with atomic_path(out / INPUTS_NAME) as tmp:
        tmp.write_text(json.dumps(hashes, indent=1) + "\n")
