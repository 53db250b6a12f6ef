"""TCGA cohorts: patient and tissue-source site from barcodes; site-preserved folds next to patient-grouped ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.errors import InputError
from mil.data.splits import main as split_main
from mil.data.splits import tcga_ids


def tcga_labels(path, n_sites: int = 12, patients: int = 3) -> pd.DataFrame:
    """Synthetic TCGA-NSCLC-like ids: sites send mostly one subtype (as in TCGA), some patients have 2 slides."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n_sites):
        site = f"{chr(65 + s // 6)}{s % 6}"  # A0..A5, B0..
        for p in range(patients):
            patient = f"TCGA-{site}-{1000 + p:04d}"
            label = int((s % 2 == 0) == (p == 2))  # 0 = LUAD, 1 = LUSC
            for slide in range(1 + int(rng.integers(0, 2))):
                rows.append({"slide_id": f"{patient}-01Z-00-DX{slide + 1}.{s}{p}{slide}ABC", "label": label})
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False)
    return frame


def test_tcga_barcode_gives_patient_and_site():
    assert tcga_ids("TCGA-05-4244-01Z-00-DX1.d4ff32cd-38cf-40ea-8213-45c2b100ac01") == ("TCGA-05-4244", "05")
    assert tcga_ids("tcga-a6-2684") == ("TCGA-A6-2684", "A6")
    assert tcga_ids("slide_001") is None and tcga_ids("TCGA-05") is None


@pytest.mark.parametrize("group_by", ["case", "site"])
def test_folds_keep_each_group_on_one_side(tmp_path, group_by):
    labels = tmp_path / "labels.csv"
    tcga_labels(labels)
    out = tmp_path / "folds.csv"
    split_main(["--labels", str(labels), "--out", str(out), "--k", "3", "--val_fraction", "0.25",
                "--group_by", group_by])
    folds = pd.read_csv(out)
    assert (folds["case_id"] == folds["slide_id"].str[:12]).all()
    assert (folds["site"] == folds["slide_id"].str[5:7]).all()
    column = "site" if group_by == "site" else "case_id"
    leaks = {"site": 0, "case_id": 0}
    for fold in ("fold_0", "fold_1", "fold_2"):
        assert set(folds[fold]) == {"train", "val", "test"}
        assert (folds.groupby(column)[fold].nunique() == 1).all(), f"{fold}: a {column} spans two splits"
        leaks["site"] += int((folds.groupby("site")[fold].nunique() > 1).sum())
    if group_by == "case":  # patient-grouped folds do let sites straddle splits: the site mode is not a no-op
        assert leaks["site"] > 0
    tested = pd.concat([folds.loc[folds[f] == "test", "slide_id"] for f in ("fold_0", "fold_1", "fold_2")])
    assert sorted(tested) == sorted(folds["slide_id"])


def test_site_folds_without_sites_fail_in_one_line(tmp_path):
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(8)], "label": [0, 1] * 4}).to_csv(labels, index=False)
    with pytest.raises(InputError, match="--group_by site needs a site column"):
        split_main(["--labels", str(labels), "--out", str(tmp_path / "o.csv"), "--group_by", "site"])
