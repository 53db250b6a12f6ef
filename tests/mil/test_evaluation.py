"""Slide-level evaluation: metrics against sklearn, thresholds from validation only, bootstrap intervals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from eval_inputs import asap_xml, noisy_predictions, write_patch_scores, write_predictions
from fixtures import write_bag
from sklearn.metrics import (
    accuracy_score, balanced_accuracy_score, f1_score, recall_score, roc_auc_score,
)

from features.errors import InputError
from mil.__main__ import main as mil_main
from mil.evaluation.bootstrap import Interval, bootstrap, stratified_indices
from mil.evaluation.metrics import binary_statistic, multiclass_statistic
from mil.evaluation.patch_truth import evaluate_patches, slide_truth
from mil.evaluation.report import FIXED_NAME, YOUDEN_NAME, format_slide_table, write_run_metrics
from mil.evaluation.thresholds import metrics_at_threshold, youden_threshold


def test_threshold_metrics_match_sklearn():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
    scores = np.array([0.1, 0.6, 0.3, 0.8, 0.45, 0.9, 0.5, 0.2, 0.7, 0.55])
    for threshold in (0.3, 0.5, 0.65):
        predicted = (scores >= threshold).astype(int)
        got = metrics_at_threshold(labels, scores, threshold)
        assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
        assert got["f1"] == pytest.approx(f1_score(labels, predicted))
        assert got["sensitivity"] == pytest.approx(recall_score(labels, predicted))
        assert got["specificity"] == pytest.approx(recall_score(1 - labels, 1 - predicted))


def test_threshold_metrics_on_one_class_and_empty_sets():
    # Bootstrap resamples and small validation sets hit these: an undefined ratio is NaN, balanced accuracy is
    # the defined one of sensitivity/specificity, and F1 is 0 when there is nothing positive at all.
    normals = metrics_at_threshold([0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert np.isnan(normals["sensitivity"]) and normals["specificity"] == pytest.approx(2 / 3)
    assert normals["balanced_accuracy"] == pytest.approx(2 / 3) and normals["f1"] == 0.0
    quiet = metrics_at_threshold([0, 0], [0.1, 0.2], 0.5)
    assert quiet["f1"] == 0.0 and quiet["accuracy"] == 1.0 and quiet["balanced_accuracy"] == 1.0
    empty = metrics_at_threshold([], [], 0.5)
    assert all(np.isnan(empty[name]) for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity"))


def test_youden_on_a_hand_computed_set():
    # J at each cut: 0.9 -> .25, 0.7 -> .5, 0.6 -> .75 (3/4 positives, no negatives), 0.5 -> .417, 0.3 -> .667
    labels = [0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.5, 0.3, 0.6, 0.7, 0.9]
    assert youden_threshold(labels, scores) == pytest.approx(0.6)
    # a tie in J (0.8 and 0.35 both give .5) goes to the higher threshold
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="Youden's J needs both classes"):
        youden_threshold([1, 1], [0.2, 0.3])


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    labels = np.arange(30) % 3
    logits = rng.normal(size=(30, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = multiclass_statistic(labels, probs)
    predicted = probs.argmax(axis=1)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert got["f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_metrics_with_absent_and_unpredicted_classes():
    # What bootstrap resamples of a small multi-class set look like: a class absent from the labels, a present
    # class never predicted, one class only, nothing at all. Macro means run over the classes that are defined.
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])
    labels = np.array([0, 0, 1, 1, 1])  # class 2 absent but predicted once; class 1 present, predicted once
    got = multiclass_statistic(labels, probs)
    predicted = probs.argmax(axis=1)
    assert got["auc"] == pytest.approx(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in (0, 1)]))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert got["f1"] == pytest.approx(f1_score(labels, predicted, labels=[0, 1, 2], average="macro"))
    never = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.8, 0.1, 0.1]])  # class 2 present, never predicted
    got = multiclass_statistic(np.array([0, 1, 2]), never)
    assert got["f1"] == pytest.approx(f1_score([0, 1, 2], never.argmax(1), average="macro"))  # class 2 counts as 0
    one_class = multiclass_statistic(np.array([1, 1]), probs[:2])
    assert np.isnan(one_class["auc"]) and one_class["accuracy"] == 0.0 and one_class["balanced_accuracy"] == 0.0
    empty = multiclass_statistic(np.array([], dtype=int), np.zeros((0, 3)))
    assert all(np.isnan(v) for v in empty.values())


def test_stratified_resamples_keep_class_counts_even_with_one_positive():
    labels = np.array([0] * 29 + [1])
    index = stratified_indices(labels, 200, seed=0)
    assert index.shape == (200, 30)
    assert (labels[index].sum(axis=1) == 1).all()  # never a one-class resample
    scores = np.linspace(0, 1, 30)
    intervals = bootstrap(binary_statistic({FIXED_NAME: 0.5}), labels, scores, n_resamples=200, seed=0)
    # The lone positive is in every resample: an interval would show the normals' spread only, so none is given.
    assert intervals["auc"].value == pytest.approx(1.0)
    assert np.isnan(intervals["auc"].low) and np.isnan(intervals["auc"].high)
    two = bootstrap(binary_statistic({FIXED_NAME: 0.5}), np.array([0] * 28 + [1] * 2), scores, n_resamples=200)
    assert np.isfinite(two["auc"].low)


def test_bootstrap_contains_point_and_is_seeded():
    labels, scores = noisy_predictions(60, 1.5, seed=1)
    statistic = binary_statistic({FIXED_NAME: 0.5})
    first = bootstrap(statistic, labels, scores, n_resamples=150, seed=7)
    again = bootstrap(statistic, labels, scores, n_resamples=150, seed=7)
    other = bootstrap(statistic, labels, scores, n_resamples=150, seed=8)
    assert first == again
    assert first["auc"] != other["auc"]
    assert first["auc"].value == pytest.approx(roc_auc_score(labels, scores))
    for interval in first.values():
        assert interval.low <= interval.value <= interval.high
        assert interval.high - interval.low > 0


def test_every_bootstrap_resample_keeps_the_class_counts():
    # Whatever the statistic, it must only ever see resamples with the evaluated set's class counts.
    labels = np.array([1] * 3 + [0] * 17)
    rng = np.random.default_rng(0)
    scores = rng.random(20)
    seen: list[tuple[int, int]] = []

    def counts(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
        seen.append((int((y == 1).sum()), int((y == 0).sum())))
        return {"positives": float((y == 1).sum()), "mean_positive_score": float(s[y == 1].mean())}

    intervals = bootstrap(counts, labels, scores, n_resamples=300, seed=1)
    assert len(seen) == 301 and set(seen) == {(3, 17)}
    assert intervals["positives"] == Interval(3.0, 3.0, 3.0)
    # rows are resampled with their labels: a positive's score never travels with a negative's label
    positive_mean = intervals["mean_positive_score"]
    assert scores[labels == 1].min() <= positive_mean.low < positive_mean.high <= scores[labels == 1].max()


def test_bootstrap_with_one_resample_one_slide_or_none():
    mean = lambda y, s: {"mean": float(np.mean(s))}  # noqa: E731
    one = bootstrap(mean, np.array([0]), np.array([0.3]), n_resamples=10)["mean"]
    assert one.value == 0.3 and np.isnan(one.low) and np.isnan(one.high)  # one slide says nothing of its spread
    single = bootstrap(mean, np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), n_resamples=1)["mean"]
    assert np.isfinite(single.low) and single.low == single.high
    off = bootstrap(mean, np.array([0, 1]), np.array([0.1, 0.9]), n_resamples=0)["mean"]
    assert off.value == pytest.approx(0.5) and np.isnan(off.low) and np.isnan(off.high)


def test_reported_interval_is_stratified_end_to_end(tmp_path):
    # Every slide is predicted normal, so accuracy is exactly the share of normal slides in any resample that keeps
    # the class counts: its interval collapses onto the point. An unstratified bootstrap would spread it.
    labels = np.array([0] * 30 + [1] * 10)
    write_predictions(tmp_path / "predictions_test.csv", labels, np.full(40, 0.1), "test")
    slide = write_run_metrics(tmp_path, n_resamples=200, seed=0)["slide"]
    accuracy = slide["metrics"][f"{FIXED_NAME}/accuracy"]
    assert accuracy == {"value": pytest.approx(0.75), "ci_low": pytest.approx(0.75), "ci_high": pytest.approx(0.75)}
    assert slide["bootstrap"]["stratified_by"] == "label"


def test_percentile_interval_is_95_percent_wide():
    # One class, statistic = mean: the bootstrap distribution of a mean of n normal draws is close to normal with
    # sd = s / sqrt(n), so a 95% percentile interval spans 2 x 1.96 sd (a 90% one only 2 x 1.645 sd).
    values = np.random.default_rng(0).normal(size=400)
    mean = lambda y, s: {"mean": float(s.mean())}  # noqa: E731
    interval = bootstrap(mean, np.zeros(400, dtype=int), values, n_resamples=4000, seed=0)["mean"]
    sd = values.std() / np.sqrt(len(values))
    assert (interval.high - interval.low) / (2 * 1.96 * sd) == pytest.approx(1.0, abs=0.06)
    assert interval.low < values.mean() < interval.high


def test_reported_interval_level_matches_its_label(tmp_path):
    # metrics.json and the printed table call the interval 95%: the stored bounds must be the 2.5th and 97.5th
    # percentiles of the resampled statistic, recomputed here from the same stratified resamples.
    labels, scores = noisy_predictions(50, 1.0, seed=3)
    write_predictions(tmp_path / "predictions_test.csv", labels, scores, "test")
    slide = write_run_metrics(tmp_path, n_resamples=200, seed=5)["slide"]
    assert slide["bootstrap"]["level"] == pytest.approx(0.95)
    aucs = [roc_auc_score(labels[i], scores[i]) for i in stratified_indices(labels, 200, seed=5)]
    low, high = np.quantile(aucs, [0.025, 0.975])
    assert slide["metrics"]["auc"]["ci_low"] == pytest.approx(low)
    assert slide["metrics"]["auc"]["ci_high"] == pytest.approx(high)
    assert "95% CI" in format_slide_table(slide)
    assert "90% CI" in format_slide_table({**slide, "bootstrap": {**slide["bootstrap"], "level": 0.9}})


def test_thresholds_come_from_validation_not_test(tmp_path):
    # validation: positives sit low, so Youden picks a low threshold; test: a high one would be best
    val_labels = np.array([0] * 6 + [1] * 6)
    val_scores = np.array([0.05, 0.1, 0.12, 0.15, 0.2, 0.3, 0.25, 0.35, 0.4, 0.45, 0.5, 0.6])
    test_labels, test_scores = noisy_predictions(40, 2.0, seed=2)
    test_scores = 0.5 + 0.5 * test_scores  # everything above 0.5: test's own optimum is far from val's
    write_predictions(tmp_path / "predictions_val.csv", val_labels, val_scores, "val")
    write_predictions(tmp_path / "predictions_test.csv", test_labels, test_scores, "test")
    (tmp_path / "metrics.json").write_text(json.dumps({"training": {"best_epoch": 3}}))

    metrics = write_run_metrics(tmp_path, n_resamples=200, seed=0)

    slide = metrics["slide"]
    val_threshold = youden_threshold(val_labels, val_scores)
    assert val_threshold == pytest.approx(0.35)  # J = 5/6 at 0.35 and at 0.25; ties go to the higher one
    assert abs(youden_threshold(test_labels, test_scores) - val_threshold) > 0.1
    assert slide["thresholds"] == {FIXED_NAME: 0.5, YOUDEN_NAME: pytest.approx(val_threshold)}
    assert slide["evaluated_split"] == "test" and slide["n_slides"] == 40
    expected = metrics_at_threshold(test_labels, test_scores, val_threshold)
    for name, value in expected.items():
        assert slide["metrics"][f"{YOUDEN_NAME}/{name}"]["value"] == pytest.approx(value)
    assert slide["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(test_labels, test_scores))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["training"] == {"best_epoch": 3}  # other sections are kept
    assert on_disk["slide"]["thresholds"][YOUDEN_NAME] == pytest.approx(val_threshold)
    assert (tmp_path / "roc.png").stat().st_size > 1000


def test_without_validation_only_the_fixed_threshold(tmp_path):
    labels, scores = noisy_predictions(20, 2.0, seed=4)
    frame = pd.DataFrame({"slide_id": [f"s{i}" for i in range(20)], "label": np.where(labels, "tumor", "normal"),
                          "score": scores, "split": "test"})
    frame.to_csv(tmp_path / "predictions.csv", index=False)
    slide = write_run_metrics(tmp_path, n_resamples=50)["slide"]
    assert slide["thresholds"] == {FIXED_NAME: 0.5}
    assert "no validation" in slide["threshold_source"]
    assert slide["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(labels, scores))


def test_multiclass_run(tmp_path):
    rng = np.random.default_rng(5)
    labels = np.arange(24) % 3
    probs = rng.dirichlet(np.ones(3), size=24) + np.eye(3)[labels]
    probs /= probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame({"slide_id": [f"s{i}" for i in range(24)], "label": labels, "score": probs[:, 1],
                          "split": "test", **{f"prob_{c}": probs[:, i] for i, c in enumerate("abc")}})
    frame.to_csv(tmp_path / "predictions_test.csv", index=False)
    slide = write_run_metrics(tmp_path, n_resamples=50)["slide"]
    assert slide["task"] == "multiclass" and slide["classes"] == ["a", "b", "c"]
    assert slide["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert set(slide["metrics"]) == {"auc", "accuracy", "balanced_accuracy", "f1"}


def test_evaluate_command(tmp_path, capsys):
    val = write_predictions(tmp_path / "in" / "val.csv", *noisy_predictions(20, 2.0, seed=6), "val")
    test = write_predictions(tmp_path / "in" / "test.csv", *noisy_predictions(30, 2.0, seed=7), "test")
    code = mil_main(["evaluate", "--predictions", str(test), "--val_predictions", str(val),
                     "--out", str(tmp_path / "out"), "--n_bootstrap", "100"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "youden_val/balanced_accuracy" in printed and "95% CI" in printed
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["slide"]["n_slides"] == 30


def test_evaluate_command_bad_input(tmp_path, capsys):
    assert mil_main(["evaluate", "--predictions", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,label,score\na,maybe,0.3\n")
    assert mil_main(["evaluate", "--predictions", str(bad)]) == 2


# --- patch-level truth -------------------------------------------------------------------------------------

PATCH = 64


def grid(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(x0, x1, PATCH), np.arange(y0, y1, PATCH))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


@pytest.fixture
def patch_run(tmp_path):
    """Three slides of a 8 x 6 patch grid: a tumor slide with tumor and look-alike regions, a normal slide
    without annotations, and a tumor slide without annotations (no truth: skipped)."""
    coords = grid(0, 0, 8 * PATCH, 6 * PATCH)
    tumor = (coords[:, 0] < 3 * PATCH) & (coords[:, 1] < 3 * PATCH)  # 9 patches inside the tumor box
    lookalike = (coords[:, 0] >= 5 * PATCH) & (coords[:, 1] >= 4 * PATCH)  # 6 patches
    # polygons cover whole patches, plus a sliver of the next ones (overlap 1/8 < 0.5: not tumor)
    asap_xml(tmp_path / "ann" / "t1.xml", {"Tumor": [box(0, 0, 3 * PATCH + 8, 3 * PATCH + 8)],
                                           "lookalike": [box(5 * PATCH, 4 * PATCH, 8 * PATCH, 6 * PATCH)]})
    rng = np.random.default_rng(0)
    for slide_id in ("t1", "n1", "t2"):
        write_bag(tmp_path / "features" / f"{slide_id}.h5", rng.normal(size=(len(coords), 4)), coords,
                  patch_size_level0=PATCH)
    write_predictions(tmp_path / "run" / "predictions_test.csv", [1, 0, 1], [0.9, 0.2, 0.8], "test")
    frame = pd.read_csv(tmp_path / "run" / "predictions_test.csv")
    frame["slide_id"] = ["t1", "n1", "t2"]
    frame.to_csv(tmp_path / "run" / "predictions_test.csv", index=False)
    return tmp_path, coords, tumor, lookalike


def test_patch_auc_is_one_when_scores_follow_the_annotation(patch_run, capsys):
    root, coords, tumor, lookalike = patch_run
    scores = np.where(tumor, 2.0, 0.0) + np.where(lookalike, 1.0, 0.0) + np.linspace(0, 0.1, len(coords))
    for slide_id in ("t1", "n1", "t2"):
        write_patch_scores(root / "run" / "patch_scores" / f"{slide_id}.h5", coords,
                           scores if slide_id == "t1" else np.zeros(len(coords)))
    code = mil_main(["evaluate", "--run", str(root / "run"), "--annotations", str(root / "ann"), "--features",
                     str(root / "features"), "--top_k", "5", "--n_bootstrap", "20"])
    assert code == 0
    assert "tumor vs look-alike AUC" in capsys.readouterr().out
    patch = json.loads((root / "run" / "metrics.json").read_text())["patch"]
    assert patch["n_slides"] == 2 and set(patch["skipped"]) == {"t2"}
    assert patch["n_tumor_patches"] == 9 and patch["n_lookalike_patches"] == 6
    assert patch["pooled_auc"] == pytest.approx(roc_auc_score(np.r_[tumor, np.zeros_like(tumor)],
                                                              np.r_[scores, np.zeros(len(coords))]))
    assert patch["pooled_auc"] > 0.99 and patch["mean_slide_auc"] == pytest.approx(1.0)
    assert patch["tumor_vs_lookalike_auc"] == pytest.approx(1.0)
    assert patch["mean_recall_at_k"] == pytest.approx(5 / 9) and patch["mean_precision_at_k"] == pytest.approx(1.0)
    assert "slide" in json.loads((root / "run" / "metrics.json").read_text())
    # these patch score files hold no attention: a clear input error, not a crash
    assert mil_main(["evaluate", "--run", str(root / "run"), "--annotations", str(root / "ann"), "--features",
                     str(root / "features"), "--score", "attention", "--n_bootstrap", "0"]) == 2
    assert "attention" in capsys.readouterr().err


def test_patch_metrics_expose_a_model_fooled_by_lookalikes(patch_run):
    root, coords, tumor, lookalike = patch_run
    fooled = np.where(tumor, 1.0, 0.0) + np.where(lookalike, 2.0, 0.0)
    write_patch_scores(root / "run" / "patch_scores" / "t1.h5", coords, fooled)
    patch = evaluate_patches(root / "run", root / "features", root / "ann", {"t1": 1}, top_k=10)
    assert patch["tumor_vs_lookalike_auc"] == pytest.approx(0.0)
    assert patch["mean_precision_at_k"] == pytest.approx(4 / 10)  # 6 look-alikes rank first, then 4 tumor
    assert patch["mean_recall_at_k"] == pytest.approx(4 / 9)
    stricter = evaluate_patches(root / "run", root / "features", root / "ann", {"t1": 1}, min_overlap=0.1)
    assert stricter["n_tumor_patches"] == 9 + 6  # the six 1/8-covered neighbours now count as tumor


def test_patch_truth_refuses_features_tiled_otherwise_than_the_scores(patch_run):
    """Patch truth takes each patch's size from --features: a folder of another tiling measured tumor overlap over
    the wrong squares without a word. Another encoder on the same tiling is fine (only geometry is read)."""
    import h5py

    root, coords, tumor, lookalike = patch_run
    path = write_patch_scores(root / "run" / "patch_scores" / "t1.h5", coords, np.where(tumor, 1.0, 0.0))
    for scored_mpp, encoder, refused in ((0.25, "synthetic", True), (0.5, "another_encoder", False)):
        with h5py.File(path, "r+") as h5:
            h5.attrs["feature_settings"] = json.dumps({"mpp": scored_mpp, "encoder.name": encoder})
        if refused:
            with pytest.raises(InputError, match="made with mpp 0.5 where the patch scores came from features "
                                                 "with 0.25"):
                evaluate_patches(root / "run", root / "features", root / "ann", {"t1": 1})
        else:
            assert evaluate_patches(root / "run", root / "features", root / "ann", {"t1": 1})["n_slides"] == 1


def test_camelyon_exclusion_holes_are_normal(tmp_path):
    coords = grid(0, 0, 4 * PATCH, 4 * PATCH)
    hole = (coords[:, 0] == PATCH) & (coords[:, 1] == PATCH)
    xml = asap_xml(tmp_path / "s.xml", {"_0": [box(0, 0, 4 * PATCH, 4 * PATCH)],
                                        "_2": [box(PATCH, PATCH, 2 * PATCH, 2 * PATCH)]})
    truth = slide_truth("s", coords, np.zeros(len(coords)), PATCH, xml, 1, 0.5)
    assert truth.n_tumor == 15 and not truth.tumor[hole].any()
    assert slide_truth("s", coords, np.zeros(len(coords)), PATCH, None, 1, 0.5) is None
    assert slide_truth("s", coords, np.zeros(len(coords)), PATCH, None, 0, 0.5).n_tumor == 0


def test_one_slide_per_class_gives_no_interval_and_says_why(tmp_path):
    """Two test slides ranked the wrong way round: AUC 0.000, and a stratified bootstrap resamples each class to its
    one slide, so every resample gives 0.000 too. [0.000, 0.000] would claim certainty from two slides."""
    write_predictions(tmp_path / "predictions_val.csv", [0, 1, 0, 1], [0.2, 0.7, 0.4, 0.6], "val")
    write_predictions(tmp_path / "predictions_test.csv", [0, 1], [0.8, 0.3], "test")
    slide = write_run_metrics(tmp_path, n_resamples=50)["slide"]
    assert slide["metrics"]["auc"] == {"value": 0.0, "ci_low": None, "ci_high": None}
    assert any("a single slide of class 0 and of class 1" in note for note in slide["notes"])
    assert "| auc | 0.000 | [n/a, n/a] |" in format_slide_table(slide)
    # One more slide of each class and the interval is back, the note gone.
    write_predictions(tmp_path / "predictions_test.csv", [0, 1, 0, 1], [0.8, 0.3, 0.2, 0.9], "test")
    slide = write_run_metrics(tmp_path, n_resamples=50)["slide"]
    assert slide["metrics"]["auc"]["ci_low"] is not None and not any("single slide" in n for n in slide["notes"])


def test_one_class_test_split_reports_undefined_auc(tmp_path):
    write_predictions(tmp_path / "predictions_val.csv", [0, 1, 0, 1], [0.2, 0.7, 0.4, 0.6], "val")
    write_predictions(tmp_path / "predictions_test.csv", [0, 0, 0], [0.1, 0.8, 0.3], "test")
    slide = write_run_metrics(tmp_path, n_resamples=20)["slide"]
    assert slide["metrics"]["auc"]["value"] is None
    assert slide["metrics"]["youden_val/specificity"]["value"] == pytest.approx(2 / 3)  # threshold 0.6 from val
    assert any("one class" in note for note in slide["notes"])
