"""Which slides to read, opening them with OpenSlide, and their resolution in microns per pixel.

A slide list is a folder (every file OpenSlide may read; a folder of DICOM files is one slide) or a CSV with
``slide_id`` and ``path`` columns (paths relative to the CSV's folder unless absolute) and an optional ``mpp``
column. Resolution comes from the slide's metadata, else from that ``mpp`` column, else the slide is refused:
a guessed resolution would silently change the field of view of every patch.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import openslide
import pandas as pd

from features.errors import InputError
from features.store import safe_slide_id

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi", ".dcm",
})
# Level-0 resolutions outside this range are scanner metadata errors, not real scans (boxes.tiff says 352.8).
PLAUSIBLE_MPP = (0.05, 20.0)


@dataclass(frozen=True)
class SlideRef:
    """One slide to process: its id (the output file name), where it is, and an optional mpp override."""

    slide_id: str
    path: Path
    mpp: float | None = None


def list_slides(source: str | Path) -> list[SlideRef]:
    """Slides from a folder or a ``slide_id,path[,mpp]`` CSV, sorted by id, ids checked to be safe file names."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        refs = _slides_from_csv(source)
    elif source.is_dir():
        refs = _slides_from_folder(source)
    else:
        raise InputError(f"{source}: not a slide folder or a CSV file; pass --slides DIR or --slides slides.csv")
    ids = [ref.slide_id for ref in refs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(f"{source}: duplicate slide ids {duplicates[:5]}; give every slide a unique slide_id")
    if not refs:
        raise InputError(f"{source}: no slides found; expected files with suffixes {sorted(SLIDE_SUFFIXES)}")
    return sorted(refs, key=lambda ref: ref.slide_id)


def _slides_from_csv(csv_path: Path) -> list[SlideRef]:
    # Read every cell as text: an empty slide_id must stay empty (and be refused), not become the id "nan".
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = {"slide_id", "path"} - set(table.columns)
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {sorted(missing)}; a slides CSV needs slide_id,path[,mpp]")
    refs = []
    for row in table.itertuples(index=False):
        path = Path(str(row.path))
        path = path if path.is_absolute() else (csv_path.parent / path)
        if not path.exists():
            raise InputError(f"{csv_path}: slide {row.slide_id!r} points to {path}, which does not exist; fix the path")
        mpp = _optional_mpp(getattr(row, "mpp", ""), csv_path, row.slide_id)
        refs.append(SlideRef(safe_slide_id(row.slide_id, str(csv_path)), path, mpp))
    return refs


def _optional_mpp(text: str, csv_path: Path, slide_id: str) -> float | None:
    if not str(text).strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{csv_path}: mpp {text!r} of slide {slide_id!r} is not a number; write e.g. 0.25") from None
    return None if math.isnan(value) else value


def _slides_from_folder(folder: Path) -> list[SlideRef]:
    refs = []
    entries = sorted(folder.iterdir())
    dicom_here = [p for p in entries if p.suffix.lower() == ".dcm"]
    if dicom_here:
        refs.append(_dicom_ref(folder, dicom_here))
    for entry in entries:
        if entry.is_file() and entry.suffix.lower() in SLIDE_SUFFIXES - {".dcm"}:
            refs.append(SlideRef(safe_slide_id(entry.stem, str(folder)), entry))
        elif entry.is_dir():
            dicom = sorted(entry.glob("*.dcm"))
            if dicom:  # a DICOM WSI is a folder of instances; MRXS companion folders hold no .dcm
                refs.append(_dicom_ref(entry, dicom))
    return refs


def _dicom_ref(folder: Path, files: list[Path]) -> SlideRef:
    """A DICOM series is one slide: OpenSlide opens it from any of its files and finds the rest beside it."""
    stem = os.path.commonprefix([f.stem for f in files]).rstrip("_-. ") or folder.name
    return SlideRef(safe_slide_id(stem, str(folder)), files[0])


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a slide or raise an InputError that names it and says what to do."""
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as error:
        reason = str(error).strip() or type(error).__name__
        raise InputError(
            f"{path}: OpenSlide cannot open this slide ({reason}); check the file is complete and in a format "
            "OpenSlide reads, or pass --skip_errors to go on without it"
        ) from None


def metadata_mpp(slide: openslide.OpenSlide) -> float | None:
    """Level-0 microns per pixel from the slide's own metadata, or None."""
    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            values.append(float(slide.properties[key]))
        except (KeyError, ValueError):
            pass
    if not values:
        return None
    if len(values) == 2 and abs(values[0] - values[1]) > 0.05 * max(values):
        log.warning("anisotropic pixels (mpp-x %.4f, mpp-y %.4f); using their mean", *values)
    return sum(values) / len(values)


def slide_mpp(slide: openslide.OpenSlide, ref: SlideRef) -> tuple[float, str]:
    """(level-0 mpp, where it came from): metadata if plausible, else the CSV's ``mpp``, else an InputError."""
    from_metadata = metadata_mpp(slide)
    if from_metadata is not None and _plausible(from_metadata):
        if ref.mpp is not None and abs(ref.mpp - from_metadata) > 0.1 * from_metadata:
            log.warning("%s: CSV mpp %.4f disagrees with metadata %.4f; using metadata", ref.slide_id, ref.mpp,
                        from_metadata)
        return from_metadata, "metadata"
    if ref.mpp is not None:
        if not _plausible(ref.mpp):
            raise InputError(f"{ref.path}: mpp {ref.mpp} from the slides CSV is outside {PLAUSIBLE_MPP}; fix the CSV")
        note = "" if from_metadata is None else f" (metadata {from_metadata:g} implausible)"
        return ref.mpp, f"csv{note}"
    if from_metadata is not None:
        raise InputError(
            f"{ref.path}: metadata says {from_metadata:g} microns per pixel, which is not a real scan resolution; "
            "give the true value in an `mpp` column of a slides CSV (--slides slides.csv with slide_id,path,mpp)"
        )
    raise InputError(
        f"{ref.path}: no microns-per-pixel in the slide metadata; give it in an `mpp` column of a slides CSV "
        "(--slides slides.csv with slide_id,path,mpp)"
    )


def _plausible(mpp: float) -> bool:
    return PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]
