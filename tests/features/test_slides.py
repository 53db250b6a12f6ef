"""Slide lists, opening real vendor files, and resolution with its source."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from features.errors import InputError
from features.slides import SlideRef, list_slides, open_slide, slide_mpp
from fixtures import REAL_SLIDES, write_tiny_slide


def test_folder_lists_tiff_svs_and_a_dicom_series_as_one_slide(tmp_path: Path) -> None:
    for name in ["small.svs", "boxes_0.dcm", "boxes_1.dcm"]:
        shutil.copy(REAL_SLIDES / name, tmp_path / name)
    write_tiny_slide(tmp_path / "tiny.tiff")
    refs = list_slides(tmp_path)
    assert [r.slide_id for r in refs] == ["boxes", "small", "tiny"]
    for ref in refs:
        slide = open_slide(ref.path)
        mpp, source = slide_mpp(slide, ref)
        assert source == "metadata" and 0.4 < mpp < 0.6


def test_csv_paths_are_relative_to_the_csv_and_give_mpp_overrides(tmp_path: Path) -> None:
    shutil.copy(REAL_SLIDES / "boxes.tiff", tmp_path / "boxes.tiff")
    (tmp_path / "slides.csv").write_text("slide_id,path,mpp\nbx,boxes.tiff,0.5\n")
    (ref,) = list_slides(tmp_path / "slides.csv")
    mpp, source = slide_mpp(open_slide(ref.path), ref)
    assert mpp == 0.5 and source.startswith("csv") and "352.778" in source


def test_implausible_metadata_without_override_is_a_clear_error() -> None:
    ref = SlideRef("boxes", REAL_SLIDES / "boxes.tiff")
    with pytest.raises(InputError, match=r"boxes.tiff.*not a real scan resolution.*mpp"):
        slide_mpp(open_slide(ref.path), ref)


def test_missing_mpp_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    path = write_tiny_slide(tmp_path / "nompp.tiff", mpp=None)
    with pytest.raises(InputError, match=r"nompp.tiff: no microns-per-pixel"):
        slide_mpp(open_slide(path), SlideRef("nompp", path))


def test_unopenable_slide_names_the_file() -> None:
    with pytest.raises(InputError, match=r"unopenable.tiff: OpenSlide cannot open"):
        open_slide(REAL_SLIDES / "unopenable.tiff")


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "..", ".hidden", ""])
def test_slide_ids_that_would_write_outside_the_output_are_refused(tmp_path: Path, bad_id: str) -> None:
    write_tiny_slide(tmp_path / "ok.tiff")
    (tmp_path / "slides.csv").write_text(f"slide_id,path\n{bad_id},ok.tiff\n")
    with pytest.raises(InputError, match="slide_id"):
        list_slides(tmp_path / "slides.csv")


def test_csv_pointing_to_a_missing_file_and_duplicate_ids(tmp_path: Path) -> None:
    (tmp_path / "slides.csv").write_text("slide_id,path\na,missing.tiff\n")
    with pytest.raises(InputError, match="does not exist"):
        list_slides(tmp_path / "slides.csv")
    write_tiny_slide(tmp_path / "x.tiff")
    (tmp_path / "dup.csv").write_text("slide_id,path\na,x.tiff\na,x.tiff\n")
    with pytest.raises(InputError, match="duplicate slide ids"):
        list_slides(tmp_path / "dup.csv")
