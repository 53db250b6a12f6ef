"""Labels, splits and bags: every bad input is one InputError naming the file; splits never leak a case."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import synthetic_bags, write_bag

from features.errors import InputError
from mil.data import MILDataModule, PairBatchSampler, collate_bags, read_labels
from mil.data.bags import BagDataset, BagItem, BalancedSampler
from mil.data.splits import SplitOptions, clam_splits, kfold_splits, main as split_main, make_splits


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    return synthetic_bags(tmp_path_factory.mktemp("cohort"), n_slides=12, n_patches=20, dim=6)


def _labels(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def _error(match: str, **kwargs) -> str:
    with pytest.raises(InputError, match=match) as info:
        MILDataModule(**kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_labels_map_strings_and_integers(tmp_path):
    text = _labels(tmp_path / "a.csv", ["slide_id,label,split", "s1,Tumor,train", "s2,negative,val", "s3,positive,test"])
    assert read_labels(text)["label"].tolist() == [1, 0, 1]
    ints = _labels(tmp_path / "b.csv", ["slide_id,label", "s1,2", "s2,0"])
    assert read_labels(ints)["label"].tolist() == [2, 0]
    custom = _labels(tmp_path / "c.csv", ["slide_id,label", "s1,LUAD", "s2,LUSC"])
    assert read_labels(custom, {"luad": 0, "lusc": 1})["label"].tolist() == [0, 1]


@pytest.mark.parametrize("rows, match", [
    (["slide_id,label", "s1,tumor", "s2,metastasis"], "unknown label.*metastasis"),
    (["slide_id,label", "s1,tumor", "s1,normal"], "repeated"),
    (["slide_id,grade", "s1,1"], "missing column"),
    (["slide_id,label", "../evil,tumor"], "not a plain file name"),
    (["slide_id,label,split", "s1,tumor,training"], "use train, val or test"),
])
def test_bad_labels_csv_is_one_line_naming_the_file(tmp_path, rows, match):
    path = _labels(tmp_path / "labels.csv", rows)
    with pytest.raises(InputError, match=match) as info:
        read_labels(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_datamodule_exposes_shapes_and_pos_weight(cohort):
    folder, labels = cohort
    data = MILDataModule(str(folder), str(labels))
    assert (data.feature_dim, data.num_classes) == (6, 2)
    assert data.pos_weight == pytest.approx(3 / 3)
    assert {len(data.items(s)) for s in ("train", "val", "test")} == {6, 3}
    batch = next(iter(data.val_dataloader()))
    assert batch["features"].shape == (1, 20, 6) and batch["mask"].all() and batch["coords"].shape == (1, 20, 2)


def test_pos_weight_counts_the_training_split(cohort, tmp_path):
    folder, labels = cohort
    frame = pd.read_csv(labels)
    frame.loc[frame["slide_id"] == "slide_001", "label"] = "normal"  # train: 4 normal, 2 tumor
    frame.to_csv(tmp_path / "labels.csv", index=False)
    assert MILDataModule(str(folder), str(tmp_path / "labels.csv")).pos_weight == pytest.approx(2.0)


def test_labelled_slide_without_features(cohort, tmp_path):
    folder, labels = cohort
    extra = _labels(tmp_path / "labels.csv", labels.read_text().strip().splitlines() + ["ghost_1,tumor,case_x,train"])
    message = _error("ghost_1.*drop_missing", features=str(folder), labels=str(extra))
    assert str(extra) in message
    with pytest.warns(UserWarning, match="skipping 1 labelled"):
        data = MILDataModule(str(folder), str(extra), drop_missing=True)
    assert "ghost_1" not in data.table.index


def test_features_without_labels_warn_and_are_skipped(cohort, tmp_path):
    folder, labels = cohort
    fewer = _labels(tmp_path / "labels.csv", labels.read_text().strip().splitlines()[:-1])
    with pytest.warns(UserWarning, match="have no label"):
        data = MILDataModule(str(folder), str(fewer))
    assert len(data.table) == 11


def test_mixed_dims_empty_bag_and_one_class_split(cohort, tmp_path):
    folder, labels = cohort
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    write_bag(mixed / "slide_005.h5", np.ones((20, 9), np.float32))
    assert "slide_005.h5" in _error("feature dim 9", features=str(mixed), labels=str(labels))
    empty = tmp_path / "empty"
    shutil.copytree(folder, empty)
    write_bag(empty / "slide_004.h5", np.zeros((0, 6), np.float32))
    assert "slide_004.h5" in _error("bag is empty", features=str(empty), labels=str(labels))
    frame = pd.read_csv(labels)
    frame.loc[frame["split"] == "val", "label"] = "normal"
    one_class = tmp_path / "one_class.csv"
    frame.to_csv(one_class, index=False)
    assert str(one_class) in _error("val split holds only class", features=str(folder), labels=str(one_class))
    assert "fold_3" in _error("no 'fold_3' column", features=str(folder), labels=str(labels), fold=3)


def test_clam_layout_is_read_without_conversion(cohort, tmp_path):
    folder, labels = cohort
    clam = tmp_path / "clam_results"
    (clam / "h5_files").mkdir(parents=True)
    for path in folder.glob("*.h5"):  # (1, N, D) as some tools write it; the reader must squeeze it
        with h5py.File(path) as src, h5py.File(clam / "h5_files" / path.name, "w") as dst:
            dst["features"] = src["features"][:][None]
            dst["coords"] = src["coords"][:]
    data = MILDataModule(str(clam), str(labels))
    assert data.feature_dim == 6
    batch = next(iter(data.test_dataloader()))
    assert batch["features"].shape == (1, 20, 6)


def test_training_cap_is_random_sorted_and_seeded(cohort):
    folder, _ = cohort
    item = BagItem("slide_001", folder / "slide_001.h5", 1)
    dataset = BagDataset([item], max_patches=7)
    torch.manual_seed(3)
    first = dataset[0]["coords"]
    torch.manual_seed(3)
    assert torch.equal(first, dataset[0]["coords"]) and len(first) == 7
    order = first[:, 1] * 10_000 + first[:, 0]
    assert torch.all(order[1:] > order[:-1])  # rows stay in file order, as HDF5 reads need
    cached = BagDataset([item], max_patches=None, cache_bytes=10**6)
    assert torch.equal(cached[0]["features"], cached[0]["features"]) and len(cached.cache.bags) == 1


def test_collate_pads_with_mask():
    items = [{"features": torch.ones(n, 3), "coords": torch.zeros(n, 2, dtype=torch.long), "label": n % 2,
              "slide_id": f"s{n}"} for n in (2, 5)]
    batch = collate_bags(items)
    assert batch["features"].shape == (2, 5, 3) and batch["mask"].sum(1).tolist() == [2, 5]
    assert batch["features"][0, 2:].abs().sum() == 0 and (batch["coords"][0, 2:] == -1).all()


def test_samplers_balance_and_pair():
    labels = [0] * 8 + [1] * 2
    batches = list(PairBatchSampler(labels, per_class=1, seed=0))
    assert len(batches) == 8
    assert all(labels[a] == 1 and labels[b] == 0 for a, b in batches)
    assert sorted(b for _, b in batches) == list(range(8))
    sampler = BalancedSampler(labels, seed=0)
    epochs = [[labels[i] for i in sampler] for _ in range(30)]
    assert epochs[0] != epochs[1]  # a new draw each epoch
    assert 0.4 < np.mean(epochs) < 0.6


def test_kfold_groups_never_leak_and_stratify(tmp_path):
    rng = np.random.default_rng(0)
    cases = [f"case_{i // 2}" for i in range(60)]  # two slides per patient
    labels = [int(rng.random() < 0.4) for _ in range(30) for _ in range(2)]
    path = pd.DataFrame({"slide_id": [f"s{i}" for i in range(60)], "label": labels, "case_id": cases})
    path.to_csv(tmp_path / "labels.csv", index=False)
    frame = read_labels(tmp_path / "labels.csv")
    folds = kfold_splits(frame, k=5, val_fraction=0.2, seed=1)
    test_sets = []
    for column in folds:
        per_case = folds[column].groupby(frame["case_id"]).nunique()
        assert (per_case == 1).all(), f"{column} splits a case"
        assert set(folds[column]) == {"train", "val", "test"}
        assert frame.loc[folds[column] == "val", "label"].nunique() == 2
        test_sets.append(set(folds.index[folds[column] == "test"]))
    assert set().union(*test_sets) == set(frame.index) and sum(map(len, test_sets)) == 60


def test_holdout_keeps_official_test_and_cli_writes_csv(tmp_path, capsys):
    rows = ["slide_id,label,split"] + [f"s{i},{'tumor' if i % 2 else 'normal'},{'test' if i < 6 else ''}"
                                       for i in range(26)]
    labels = _labels(tmp_path / "labels.csv", rows)
    split_main(["--labels", str(labels), "--out", str(tmp_path / "split.csv"), "--mode", "holdout",
                "--val_fraction", "0.25"])
    out = pd.read_csv(tmp_path / "split.csv")
    assert out["split"].iloc[:6].eq("test").all() and set(out["split"].iloc[6:]) == {"train", "val"}
    assert out["label"].iloc[1] == "tumor"  # labels are written as given
    assert "wrote" in capsys.readouterr().out


def test_clam_splits_import(tmp_path, cohort):
    _, labels = cohort
    for fold in (0, 1):
        ids = [f"slide_{i:03d}" for i in range(12)]
        ids = ids[fold:] + ids[:fold]
        pd.DataFrame({"train": ids[:6], "val": ids[6:9] + [None] * 3, "test": ids[9:] + [None] * 3}).to_csv(
            tmp_path / f"splits_{fold}.csv")
    out = make_splits(SplitOptions(labels=str(labels), out=str(tmp_path / "folds.csv"), mode="clam",
                                   clam=[str(tmp_path / "splits_1.csv"), str(tmp_path / "splits_0.csv")]))
    table = pd.read_csv(out).set_index("slide_id")
    assert table.loc["slide_000", "fold_0"] == "train" and table.loc["slide_000", "fold_1"] == "test"
    assert "split" not in table.columns
    with pytest.raises(InputError, match="not in the labels CSV"):
        pd.DataFrame({"train": ["nope"], "val": ["slide_000"], "test": ["slide_001"]}).to_csv(tmp_path / "bad.csv")
        clam_splits(read_labels(labels), [tmp_path / "bad.csv"])


def test_feature_statistics_come_from_the_given_bags_only(tmp_path) -> None:
    import numpy as np

    from fixtures import write_bag
    from mil.data.bags import BagItem, feature_statistics

    rng = np.random.default_rng(0)
    train = [write_bag(tmp_path / f"t{i}.h5", (rng.normal(size=(50, 3)) * [1, 10, 0] + [5, 0, 2]).astype(np.float32))
             for i in range(3)]
    write_bag(tmp_path / "test.h5", np.full((50, 3), 1000.0, np.float32))  # must not leak into the statistics
    mean, std = feature_statistics([BagItem(p.stem, p, 0) for p in train], rows_per_bag=40)
    assert np.allclose(mean, [5, 0, 2], atol=[0.5, 3.0, 1e-6]) and np.allclose(std[:2], [1, 10], rtol=0.2)
    assert std[2] == 1e-6  # a constant dimension is not divided by zero


def _poisoned_copy(folder: Path, out: Path, slide_id: str, rows: slice, value: float = np.nan) -> Path:
    """A copy of a bag folder where ``rows`` of one slide's features are ``value`` (NaN or Inf)."""
    shutil.copytree(folder, out)
    with h5py.File(out / f"{slide_id}.h5", "r+") as h5:
        features = h5["features"][:]
        features[rows] = value
        h5["features"][...] = features
    return out


def test_non_finite_features_are_refused_when_a_bag_is_read(cohort, tmp_path):
    """Issue 9 case 4: a NaN/Inf row is named (file and row) on every read path, streamed, capped and cached."""
    folder, _ = cohort
    bad = _poisoned_copy(folder, tmp_path / "bad", "slide_003", slice(13, 20), np.inf)
    item = BagItem("slide_003", bad / "slide_003.h5", 1)
    for dataset in (BagDataset([item]), BagDataset([item], cache_bytes=10**6)):
        with pytest.raises(InputError, match=r"slide_003\.h5: features row 13 \(patch at x=\d+, y=\d+\) holds NaN"):
            dataset[0]
    torch.manual_seed(0)
    capped = BagDataset([item], max_patches=19)  # a sorted random subset: the row named is the file's row
    with pytest.raises(InputError, match=r"slide_003\.h5: features row 1[3-9] "):
        capped[0]
    from mil.data.bags import feature_statistics

    with pytest.raises(InputError, match=r"slide_003\.h5: features row 13 "):
        feature_statistics([item])
    fine = BagItem("slide_002", bad / "slide_002.h5", 0)
    assert np.isfinite(BagDataset([fine])[0]["features"].numpy()).all()


def test_non_finite_error_from_a_dataloader_worker_is_one_line(cohort, tmp_path, capsys):
    from torch.utils.data import DataLoader

    from features.errors import run_command

    folder, _ = cohort
    bad = _poisoned_copy(folder, tmp_path / "bad", "slide_001", slice(4, 5))
    loader = DataLoader(BagDataset([BagItem("slide_001", bad / "slide_001.h5", 1)]), num_workers=1,
                        collate_fn=collate_bags)
    assert run_command(lambda: next(iter(loader))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad / 'slide_001.h5'}: features row 4 ")


def test_non_finite_patch_scores_are_refused(tmp_path):
    from mil.patch_scores import read_patch_scores, write_patch_scores

    coords = np.arange(8).reshape(4, 2)
    good = write_patch_scores(tmp_path / "ok", "s1", coords, np.zeros(4))
    assert read_patch_scores(good)[1].shape == (4,)
    bad = write_patch_scores(tmp_path / "bad", "s1", coords, np.array([0.0, 1.0, np.nan, np.inf]))
    with pytest.raises(InputError, match=r"s1\.h5: scores row 2 is nan \(2 non-finite of 4\)"):
        read_patch_scores(bad)


def test_empty_split_cell_is_refused_naming_the_row(cohort, tmp_path):
    """Issue 9 case 7: an empty split cell used to drop the slide from every split without a word."""
    folder, labels = cohort
    lines = labels.read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ","  # slide_003 loses its split
    text = _labels(tmp_path / "empty.csv", lines)
    message = _error("empty split cell", features=str(folder), labels=str(text))
    assert str(text) in message and "line(s) 5" in message and "slide_003" in message
