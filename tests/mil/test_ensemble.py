"""`mil ensemble`: members' slide probabilities and patch logits averaged (patches joined on coordinates, not row
order), the result read by `mil evaluate` like any run, and members of other data refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from mil.__main__ import main as mil_main
from mil.evaluation.ensemble import ENSEMBLE_NAME
from mil.patch_scores import read_patch_scores, write_patch_scores

SLIDES = ["a", "b", "c", "d"]
LABELS = [0, 1, 0, 1]
COORDS = np.array([[0, 0], [0, 64], [64, 0], [64, 64]], dtype=np.int64)


def member(root: Path, name: str, slide_scores: list[float], patch_logits: np.ndarray, order: np.ndarray,
           seed: int, features: str = "feats/resnet", labels: str = "labels.csv",
           encoder: str = "resnet50") -> Path:
    """A run folder as `mil fit` leaves it: config.yaml, predictions CSVs and patch_scores/ (rows in ``order``)."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"seed_everything": seed, "data": {
        "features": features, "labels": labels, "fold": None, "label_map": None, "seed": seed}}))
    table = pd.DataFrame({"slide_id": SLIDES, "label": LABELS, "score": slide_scores,
                          "split": ["val", "val", "test", "test"]})
    table[table.split == "val"].to_csv(run / "predictions_val.csv", index=False)
    # Written in another slide order than the first member: slides are joined by id, not by row.
    table[table.split == "test"].iloc[::-1 if seed else 1].to_csv(run / "predictions_test.csv", index=False)
    for slide_index, slide_id in enumerate(SLIDES[2:]):
        logits = patch_logits[slide_index]
        write_patch_scores(run, slide_id, COORDS[order], logits[order], attention=np.full(4, 0.25),
                           feature_settings={"encoder.name": encoder, "mpp": 0.5})
    return run


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    first_logits = np.array([[0.0, 1.0, 2.0, 3.0], [-1.0, -2.0, 5.0, 0.5]])
    second_logits = np.array([[2.0, 1.0, 0.0, -3.0], [1.0, 0.0, 1.0, 0.5]])
    first = member(tmp_path, "seed0", [0.1, 0.9, 0.2, 0.6], first_logits, np.arange(4), seed=0)
    second = member(tmp_path, "seed1", [0.3, 0.7, 0.6, 0.8], second_logits, np.array([3, 1, 0, 2]), seed=1)
    return first, second, first_logits, second_logits


def test_mean_of_members_joined_on_slide_and_coordinates(two_runs, tmp_path, capsys):
    first, second, first_logits, second_logits = two_runs
    out = tmp_path / "ensemble"
    assert mil_main(["ensemble", "--runs", f"[{first},{second}]", "--out", str(out), "--patch_scores", "mean"]) == 0
    test = pd.read_csv(out / "predictions_test.csv").set_index("slide_id")
    assert test.loc["c", "score"] == pytest.approx(0.4) and test.loc["d", "score"] == pytest.approx(0.7)
    val = pd.read_csv(out / "predictions_val.csv").set_index("slide_id")
    assert val.loc["a", "score"] == pytest.approx(0.2) and val.loc["b", "label"] == 1
    for slide_index, slide_id in enumerate(["c", "d"]):
        coords, logits = read_patch_scores(out / "patch_scores" / f"{slide_id}.h5")
        np.testing.assert_array_equal(coords, COORDS)
        np.testing.assert_allclose(logits, (first_logits[slide_index] + second_logits[slide_index]) / 2)
        with h5py.File(out / "patch_scores" / f"{slide_id}.h5") as h5:
            np.testing.assert_allclose(h5["attention"][:], 0.25)
            assert json.loads(h5.attrs["feature_settings"])["encoder.name"] == "resnet50"  # so mining can check it
    record = json.loads((out / ENSEMBLE_NAME).read_text())
    assert record["feature_settings"] == {"encoder.name": "resnet50", "mpp": 0.5}
    assert record["members"] == [str(first), str(second)] and record["patch_scores"] == "mean"
    assert [m["seed_everything"] for m in record["member_settings"]] == [0, 1]
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["features"] == "feats/resnet"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    # `mil evaluate` reads it as a run: thresholds from the mean validation scores, AUC of the mean test scores.
    assert mil_main(["evaluate", "--run", str(out), "--n_bootstrap", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["slide"]
    assert metrics["evaluated_split"] == "test" and metrics["metrics"]["auc"]["value"] == pytest.approx(1.0)
    capsys.readouterr()


def test_patch_scores_are_the_first_runs_by_default(two_runs, tmp_path, capsys):
    """Instance heads of separate fits put logits on their own scales: by default the slide probabilities are
    averaged and the patch scores are the first run's, unchanged."""
    first, second, first_logits, _ = two_runs
    out = tmp_path / "ensemble"
    assert mil_main(["ensemble", "--runs", f"[{first},{second}]", "--out", str(out)]) == 0
    assert pd.read_csv(out / "predictions_test.csv").set_index("slide_id").loc["c", "score"] == pytest.approx(0.4)
    for slide_index, slide_id in enumerate(["c", "d"]):
        coords, logits = read_patch_scores(out / "patch_scores" / f"{slide_id}.h5")
        np.testing.assert_array_equal(coords, COORDS)
        np.testing.assert_allclose(logits, first_logits[slide_index])
    assert json.loads((out / ENSEMBLE_NAME).read_text())["patch_scores"] == "first"
    assert mil_main(["ensemble", "--runs", f"[{first},{second}]", "--out", str(out), "--patch_scores", "max"]) == 2
    assert "choose first or mean" in capsys.readouterr().err


def test_members_of_other_data_are_refused_in_one_line(two_runs, tmp_path, capsys):
    first, second, first_logits, _ = two_runs
    other_features = member(tmp_path, "other_features", [0.1, 0.9, 0.2, 0.6], first_logits, np.arange(4), seed=2,
                            features="feats/vit")
    other_patches = member(tmp_path, "other_patches", [0.1, 0.9, 0.2, 0.6], first_logits, np.arange(4), seed=3)
    with h5py.File(other_patches / "patch_scores" / "c.h5", "r+") as h5:
        h5["coords"][0] = [128, 128]
    other_labels = member(tmp_path, "other_labels", [0.1, 0.9, 0.2, 0.6], first_logits, np.arange(4), seed=4)
    table = pd.read_csv(other_labels / "predictions_test.csv")
    table.loc[table.slide_id == "c", "label"] = 1
    table.to_csv(other_labels / "predictions_test.csv", index=False)
    other_slides = member(tmp_path, "other_slides", [0.1, 0.9, 0.2, 0.6], first_logits, np.arange(4), seed=5)
    # The same folder name, re-extracted with another encoder between the fits.
    remade = member(tmp_path, "remade", [0.1, 0.9, 0.2, 0.6], first_logits, np.arange(4), seed=6, encoder="vit_large")
    pd.read_csv(other_slides / "predictions_val.csv").iloc[:1].to_csv(other_slides / "predictions_val.csv", index=False)

    out = tmp_path / "ensemble"
    for bad, named in ((other_features, "data.features"), (other_patches, "other patches"),
                       (other_labels, "label of some slides"), (other_slides, "scores other slides"),
                       (remade, "encoder.name 'vit_large' where"),
                       (first, "--out is one of the --runs")):
        target = first if named.startswith("--out") else out
        assert mil_main(["ensemble", "--runs", f"[{first},{bad}]", "--out", str(target), "--patch_scores", "mean"]) == 2
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert mil_main(["ensemble", "--runs", f"[{first}]", "--out", str(out)]) == 2
    assert "at least two" in capsys.readouterr().err

    # An existing folder that is not an ensemble is never replaced; an earlier ensemble is.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    assert mil_main(["ensemble", "--runs", f"[{first},{second}]", "--out", str(precious)]) == 2
    assert "not a `mil ensemble` folder" in capsys.readouterr().err and (precious / "notes.txt").read_text() == "keep"
    for _ in range(2):
        assert mil_main(["ensemble", "--runs", f"[{first},{second}]", "--out", str(out)]) == 0
    assert (out / ENSEMBLE_NAME).is_file()
