"""CLAM and TRIDENT feature folders: their names, the attributes they carry, and patch geometry from them.

CLAM keeps ``<dir>/h5_files/<id>.h5`` (datasets ``features`` (N, D) and ``coords`` (N, 2), level-0 top-left
corners) and ``<dir>/pt_files/<id>.pt`` (the same features as one tensor). TRIDENT keeps
``<job>/features_<encoder>/<id>.h5`` beside ``<job>/patches/<id>_patches.h5``, whose ``coords`` carry the patch
geometry: ``patch_size`` (pixels at the target magnification), ``patch_size_level0``, ``level0_magnification``,
``target_magnification`` (TRIDENT's magnification is 10 / mpp), ``overlap``, ``level0_width``,
``level0_height``, ``name`` and ``savetodir``.

The patch side in level-0 pixels is all that heatmaps and patch truth need; it is looked up in this order: the
features file's own ``coords`` attributes (our store, our exports, TRIDENT), the TRIDENT patches file beside the
features folder, then ``--patch_size_level0``. A plain CLAM folder carries no geometry, so the option is needed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from features.errors import InputError
from features.store import read_attrs

CLAM_H5, CLAM_PT = "h5_files", "pt_files"
TRIDENT_PATCHES = "patches"
TRIDENT_FEATURES_PREFIX = "features_"
GEOMETRY_OPTION = "--patch_size_level0"


def magnification(mpp: float) -> float | int:
    """TRIDENT's magnification for a resolution (10 / mpp: 0.25 µm/px is 40x), an int when it is one."""
    value = 10.0 / float(mpp)
    return int(round(value)) if abs(value - round(value)) < 1e-6 else round(value, 6)


def trident_patches_file(features_file: str | Path) -> Path:
    """Where TRIDENT keeps the coords of ``<job>/features_<enc>/<id>.h5``: ``<job>/patches/<id>_patches.h5``."""
    features_file = Path(features_file)
    return features_file.parent.parent / TRIDENT_PATCHES / f"{features_file.stem}_patches.h5"


def geometry_attrs(features_file: str | Path) -> dict[str, Any]:
    """The coords attributes that describe a features file's patches: its own, else TRIDENT's patches file."""
    attrs = read_attrs(features_file, "coords")
    if "patch_size_level0" not in attrs:
        patches = trident_patches_file(features_file)
        if patches.is_file():
            attrs = {**read_attrs(patches, "coords"), **attrs}
    return attrs


def level0_patch_size(features_file: str | Path, override: int | None = None) -> int:
    """The patch side in level-0 pixels; ``override`` (``--patch_size_level0``) fills in for files without it.

    A stored value that disagrees with the override is refused rather than silently replaced.
    """
    stored = geometry_attrs(features_file).get("patch_size_level0")
    if stored is not None and override is not None and int(round(float(stored))) != int(override):
        raise InputError(f"{features_file}: coords say patch_size_level0={int(round(float(stored)))}, but "
                         f"{GEOMETRY_OPTION} {override}; drop the option or pass the stored value")
    if stored is not None:
        return int(round(float(stored)))
    if override is not None:
        if int(override) <= 0:
            raise InputError(f"{GEOMETRY_OPTION} {override}: must be a positive number of level-0 pixels")
        return int(override)
    raise InputError(f"{features_file}: no patch geometry (coords carry no patch_size_level0 and there is no "
                     f"TRIDENT patches/{Path(features_file).stem}_patches.h5); pass {GEOMETRY_OPTION} N, the "
                     "patch side in level-0 pixels")


def patch_geometry(features_file: str | Path, slide_ref, override: int | None = None):
    """The full :class:`~features.tiling.Geometry` to read a file's patches again from its slide.

    Our store (and our exports) carry it whole. For CLAM or TRIDENT files it is rebuilt from the slide: the
    level-0 side as above, read at TRIDENT's ``patch_size`` (pixels at the target magnification) or, without
    it, at the level-0 side itself; the encoder transform resizes either to its input size.
    """
    from features.slides import open_slide, slide_mpp
    from features.tiling import Geometry, TilingConfig, plan_geometry

    attrs = geometry_attrs(features_file)
    if all(f.name in attrs for f in dataclasses.fields(Geometry)):
        return Geometry.from_attrs(attrs)
    size0 = level0_patch_size(features_file, override)
    pixels = int(attrs["patch_size"]) if "target_magnification" in attrs and "patch_size" in attrs else size0
    slide = open_slide(slide_ref.path)
    try:
        mpp0, source = slide_mpp(slide, slide_ref)
        config = TilingConfig(target_mpp=mpp0 * size0 / pixels, patch_size=pixels, overlap=0)
        geometry = plan_geometry(slide, mpp0, source, config)
    finally:
        slide.close()
    return dataclasses.replace(geometry, patch_size_level0=size0)
