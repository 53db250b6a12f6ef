"""``features export``: a feature store as a CLAM or TRIDENT folder, so those tools read our embeddings as theirs.

    features export --layout clam --features store/features/resnet50 --out clam_feats/
    features export --layout trident --features store/features/resnet50 --out trident_job/

CLAM: ``h5_files/<id>.h5`` is our file itself (hard-linked: it already holds ``features`` and ``coords``, with
our geometry attributes) and ``pt_files/<id>.pt`` the features as one float32 (N, D) tensor, readable with
``torch.load(path, weights_only=True)``. TRIDENT: ``patches/<id>_patches.h5`` holds ``coords`` with the
attributes TRIDENT writes, and ``features_<encoder>/<id>.h5`` the features with the same coords, as TRIDENT's
own extraction does. Every file is written under a temporary name and renamed; a rerun skips finished files,
and ``export.json`` records what was exported so a rerun into the same folder with other settings is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
from jsonargparse import ActionConfigFile, ArgumentParser
from tqdm.auto import tqdm

from features.errors import InputError
from features.layouts import CLAM_H5, CLAM_PT, TRIDENT_FEATURES_PREFIX, TRIDENT_PATCHES, magnification
from features.store import atomic_path, find_feature_files, read_bag, safe_slide_id

RECORD_NAME = "export.json"


@dataclass
class ExportArgs:
    layout: Literal["clam", "trident"]  # which tool's folder layout to write
    features: str  # the store's features folder, <store>/features/<tag>
    out: str  # the folder to write (a CLAM features dir, or a TRIDENT job dir)
    encoder: str | None = None  # TRIDENT folder name features_<encoder> (default: the store's tag)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="features export", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--layout", type=Literal["clam", "trident"], required=True,
                        help="clam: h5_files/ + pt_files/; trident: patches/ + features_<encoder>/")
    parser.add_argument("--features", type=str, required=True,
                        help="the store's features folder, <store>/features/<tag>")
    parser.add_argument("--out", type=str, required=True,
                        help="folder to write (a CLAM features dir, a TRIDENT job dir)")
    parser.add_argument("--encoder", type=str | None, default=None,
                        help="TRIDENT folder name features_<encoder> (default: the store's tag)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    export(ExportArgs(layout=args.layout, features=args.features, out=args.out, encoder=args.encoder))


def export(args: ExportArgs) -> Path:
    files = find_feature_files(args.features)
    out = Path(args.out)
    encoder = safe_slide_id(args.encoder or Path(args.features).resolve().name, "--encoder")
    _check_record(out, {"layout": args.layout, "features": str(Path(args.features).resolve()),
                        "encoder": encoder if args.layout == "trident" else None})
    written = 0
    for slide_id, source in tqdm(sorted(files.items()), desc=f"export {args.layout}", unit="slide"):
        if args.layout == "clam":
            written += export_clam(source, slide_id, out)
        else:
            written += export_trident(source, slide_id, out, encoder)
    print(f"export: {written} file(s) written, {len(files)} slide(s) in {out}")
    return out


def _check_record(out: Path, settings: dict) -> None:
    """Refuse to mix two exports in one folder; record the settings on first use."""
    record = out / RECORD_NAME
    if record.is_file():
        before = json.loads(record.read_text())
        for key, value in settings.items():
            if before.get(key) != value:
                raise InputError(f"{out}: already holds an export with {key}={before.get(key)!r} (now {value!r}); "
                                 "pass another --out or delete that folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(settings, indent=1))


def link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link ``source`` to ``target`` (a copy across filesystems), atomically; False when already there."""
    if target.is_file():
        return False
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or links not allowed: same bytes, more space
            shutil.copyfile(source, tmp)
    return True


def export_clam(source: Path, slide_id: str, out: Path) -> int:
    """CLAM's two files for one slide; returns how many were written."""
    written = int(link_or_copy(source, out / CLAM_H5 / f"{slide_id}.h5"))
    pt = out / CLAM_PT / f"{slide_id}.pt"
    if not pt.is_file():
        import torch

        features = torch.from_numpy(np.ascontiguousarray(read_bag(source).features, dtype=np.float32))
        with atomic_path(pt) as tmp:
            torch.save(features, tmp)
        written += 1
    return written


def trident_coords_attrs(attrs: dict, slide_id: str, out: Path) -> dict:
    """TRIDENT's coords attributes from our geometry (ours are kept beside them, so nothing is lost)."""
    missing = [k for k in ("patch_size", "patch_size_level0", "target_mpp", "mpp_level0") if k not in attrs]
    if missing:
        raise InputError(f"{slide_id}: coords lack {missing}; TRIDENT needs the full geometry: re-run `features tile`")
    return {**attrs, "patch_size": int(attrs["patch_size"]), "patch_size_level0": int(attrs["patch_size_level0"]),
            "level0_magnification": magnification(attrs["mpp_level0"]),
            "target_magnification": magnification(attrs["target_mpp"]), "overlap": int(attrs.get("overlap", 0)),
            "level0_width": int(attrs.get("level0_width", 0)), "level0_height": int(attrs.get("level0_height", 0)),
            "name": slide_id, "savetodir": str(out.resolve())}


def export_trident(source: Path, slide_id: str, out: Path, encoder: str) -> int:
    """TRIDENT's patches file and features file for one slide; returns how many were written."""
    patches = out / TRIDENT_PATCHES / f"{slide_id}_patches.h5"
    features = out / f"{TRIDENT_FEATURES_PREFIX}{encoder}" / f"{slide_id}.h5"
    if patches.is_file() and features.is_file():
        return 0
    bag = read_bag(source)
    attrs = trident_coords_attrs(bag.coord_attrs, slide_id, out)
    written = 0
    if not patches.is_file():
        with atomic_path(patches) as tmp, h5py.File(tmp, "w") as h5:
            _write_attrs(h5.create_dataset("coords", data=bag.coords), attrs)
        written += 1
    if not features.is_file():
        with atomic_path(features) as tmp, h5py.File(tmp, "w") as h5:
            _write_attrs(h5.create_dataset("coords", data=bag.coords), attrs)
            dset = h5.create_dataset("features", data=bag.features)
            _write_attrs(dset, {**bag.feature_attrs, "name": slide_id,
                                "savetodir": str(features.parent.resolve()), "encoder": encoder})
        written += 1
    return written


def _write_attrs(dataset: h5py.Dataset, attrs: dict) -> None:
    for key, value in attrs.items():
        dataset.attrs[key] = "" if value is None else value
