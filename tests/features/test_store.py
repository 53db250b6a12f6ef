"""The HDF5 store: atomic writes, round trips, other tools' layouts, manifest."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from features.errors import InputError
from features.store import (
    Manifest, atomic_path, count_patches, features_path, find_feature_files, read_bag, read_coords,
    remove_stale_temporaries, write_coords,
)
from fixtures import dead_pid, write_bag


def test_round_trip_keeps_rows_aligned_and_attrs(tmp_path: Path) -> None:
    features = np.arange(30, dtype=np.float32).reshape(10, 3)
    path = write_bag(tmp_path / "a.h5", features, views=np.stack([features, features + 1]))
    bag = read_bag(path, with_views=True)
    np.testing.assert_array_equal(bag.features, features)
    assert bag.coords.shape == (10, 2) and bag.coords.dtype == np.int64
    assert bag.coord_attrs["mpp_source"] == "metadata" and bag.feature_attrs["dtype"] == "float32"
    assert bag.views.shape == (2, 10, 3)
    subset = read_bag(path, rows=np.array([7, 2]))
    np.testing.assert_array_equal(subset.features, features[[2, 7]])
    assert count_patches(path) == 10


def test_empty_bag_is_a_valid_file(tmp_path: Path) -> None:
    path = write_bag(tmp_path / "empty.h5", np.zeros((0, 4), np.float32), coords=np.zeros((0, 2), np.int64))
    assert len(read_bag(path)) == 0


def test_a_failed_write_leaves_no_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "x.h5"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_removed_and_never_listed(tmp_path: Path) -> None:
    write_bag(tmp_path / "f" / "a.h5", np.ones((2, 2), np.float32))
    (tmp_path / "f" / f"b.h5.tmp-{dead_pid()}-abc").write_text("partial")
    assert list(find_feature_files(tmp_path / "f")) == ["a"]
    assert remove_stale_temporaries(tmp_path) == 1


def test_clam_and_trident_folders_are_found(tmp_path: Path) -> None:
    clam = tmp_path / "clam" / "h5_files"
    clam.mkdir(parents=True)
    with h5py.File(clam / "s1.h5", "w") as h5:
        h5["features"] = np.ones((5, 8), np.float32)
        h5["coords"] = np.zeros((5, 2), np.int64)
    assert read_bag(find_feature_files(tmp_path / "clam")["s1"]).features.shape == (5, 8)
    trident = tmp_path / "trident" / "features_uni_v1"
    trident.mkdir(parents=True)
    with h5py.File(trident / "s2.h5", "w") as h5:
        h5["features"] = np.ones((1, 4, 6), np.float32)  # (1, N, D) as some tools store it
        h5["coords"] = np.zeros((4, 2), np.int64)
    assert read_bag(find_feature_files(tmp_path / "trident")["s2"]).features.shape == (4, 6)
    ours = features_path(tmp_path / "ours", "enc", "s3")
    write_bag(ours, np.ones((3, 2), np.float32))
    assert set(find_feature_files(tmp_path / "ours")) == {"s3"}


def test_missing_folder_and_coords_only_file_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        find_feature_files(tmp_path / "nope")
    path = write_coords(tmp_path / "c.h5", np.zeros((2, 2)), {"patch_size": 8})
    assert read_coords(path)[1]["patch_size"] == 8
    with pytest.raises(InputError, match="no 'features' dataset"):
        read_bag(path)


def test_manifest_survives_reopen(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path / "manifest.csv")
    manifest.record("b", "done", 10, 1.5)
    manifest.record("a", "error", error="bad\nfile")
    rows = Manifest(tmp_path / "manifest.csv").rows
    assert rows["a"]["error"] == "bad file" and rows["b"]["n_patches"] == "10"
    assert (tmp_path / "manifest.csv").read_text().splitlines()[0] == "slide_id,status,n_patches,seconds,error"
