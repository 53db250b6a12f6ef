"""Mining on fabricated patch scores: thresholds, ratios, training slides only, fallbacks, quality numbers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from features.errors import InputError
from features.selection import read_selection
from mil.mining import cli
from mil.mining.mine import MiningConfig, read_patch_scores, read_slide_labels, select_patches, training_patch_table
from mil.mining.pseudo_labels import PositiveSchedule, normal_calibrated_threshold, pseudo_positive_mask, sigmoid
from mil.mining.quality import candidate_pool, selection_quality
from mil.mining.twins import TwinFilter


def logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


def write_scores(folder: Path, slide_id: str, probs, patch_size_level0: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(probs)
    coords = np.stack([np.arange(n) * patch_size_level0, np.zeros(n)], axis=1).astype(np.int64)
    with h5py.File(folder / f"{slide_id}.h5", "w") as h5:
        h5.create_dataset("coords", data=coords).attrs["patch_size_level0"] = patch_size_level0
        h5.create_dataset("scores", data=logit(probs).astype(np.float32))


def table(rows: list[tuple[str, int, list[float]]], split: str = "train") -> pd.DataFrame:
    frames = [pd.DataFrame({"slide_id": s, "x": np.arange(len(p)) * 64, "y": 0, "score": logit(p), "label": y,
                            "split": split}) for s, y, p in rows]
    return pd.concat(frames, ignore_index=True)


def test_sigmoid_converts_logits_and_threshold_is_on_probability():
    assert sigmoid(np.array([0.0]))[0] == pytest.approx(0.5)
    assert sigmoid(logit([0.3]))[0] == pytest.approx(0.3)
    assert np.isfinite(sigmoid(np.array([-1e4, 1e4]))).all()


def test_schedule_grows_after_warmup():
    schedule = PositiveSchedule(start=0.2, end=0.8, warmup_rounds=1, ramp_rounds=3)
    assert [round(schedule.fraction(r), 3) for r in range(6)] == [0.2, 0.2, 0.4, 0.6, 0.8, 0.8]


def test_positive_fraction_of_above_threshold_tumor_patches():
    slides = np.array(["t"] * 10 + ["n"] * 4)
    labels = np.array([1] * 10 + [0] * 4)
    probs = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.31, 0.2, 0.1, 0.99, 0.98, 0.5, 0.1])
    mask = pseudo_positive_mask(slides, labels, probs, threshold=0.3, fraction=0.5)
    # 8 tumor-slide patches pass 0.3; half of them (the top 4) are positives; normal slides never are.
    assert np.flatnonzero(mask).tolist() == [0, 1, 2, 3]


def test_positive_fraction_within_each_site_when_grouped():
    slides = np.array(["a"] * 6 + ["b"] * 4 + ["n"] * 2)
    labels = np.array([1] * 10 + [0] * 2)
    probs = np.array([0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.5, 0.45, 0.4, 0.35, 0.99, 0.98])
    sites = np.array(["C"] * 6 + ["A"] * 4 + ["A"] * 2)
    assert np.flatnonzero(pseudo_positive_mask(slides, labels, probs, 0.3, 0.5)).tolist() == [0, 1, 2, 3, 4]
    by_site = pseudo_positive_mask(slides, labels, probs, 0.3, 0.5, groups=sites)
    assert np.flatnonzero(by_site).tolist() == [0, 1, 2, 6, 7]  # half of each site's candidates, its top ones
    few = pseudo_positive_mask(slides, labels, probs, 0.3, 0.1, groups=sites)
    assert np.flatnonzero(few).tolist() == [0, 6]  # at least one per site with candidates


def test_no_patch_passes_threshold_falls_back_to_top_patch_per_tumor_slide():
    slides = np.array(["a", "a", "b", "b", "n"])
    labels = np.array([1, 1, 1, 1, 0])
    probs = np.array([0.1, 0.2, 0.05, 0.01, 0.9])
    with pytest.warns(UserWarning, match="no tumor-slide patch"):
        mask = pseudo_positive_mask(slides, labels, probs, threshold=0.3, fraction=0.2)
    assert np.flatnonzero(mask).tolist() == [1, 2]


def test_hard_negatives_are_the_top_ratio_of_normal_patches():
    normal_probs = list(np.linspace(0.01, 0.99, 20))
    patches = table([("t1", 1, [0.9, 0.8, 0.1]), ("n1", 0, normal_probs[:10]), ("n2", 0, normal_probs[10:])])
    selection = select_patches(patches, MiningConfig(neg_ratio=0.2), round_index=0)
    hard = selection[selection["kind"] == "hard_negative"]
    assert len(hard) == 4  # 20% of 20 normal patches
    assert sorted(hard["prob"].round(4)) == sorted(np.round(normal_probs[-4:], 4))
    assert set(hard["pseudo_label"]) == {0} and set(hard["slide_label"]) == {0}
    positives = selection[selection["kind"] == "positive"]
    assert positives["slide_id"].tolist() == ["t1"] and (positives["pseudo_label"] == 1).all()


def test_random_negatives_are_seeded_and_disjoint_from_hard_ones():
    patches = table([("t1", 1, [0.9]), ("n1", 0, list(np.linspace(0.01, 0.9, 40)))])
    config = MiningConfig(neg_ratio=0.1, random_ratio=0.25, seed=3)
    first, again = select_patches(patches, config), select_patches(patches, config)
    pd.testing.assert_frame_equal(first, again)
    plain = first[first["kind"] == "negative"]
    hard = first[first["kind"] == "hard_negative"]
    assert len(plain) == 10 and len(hard) == 4
    assert not set(zip(plain.x, plain.slide_id)) & set(zip(hard.x, hard.slide_id))
    other_round = select_patches(patches, config, round_index=1)
    assert set(other_round.loc[other_round.kind == "negative", "x"]) != set(plain["x"])


def test_tiny_bags_and_minimum_hard_negatives():
    patches = table([("t1", 1, [0.6]), ("n1", 0, [0.4])])
    selection = select_patches(patches, MiningConfig(neg_ratio=0.05))
    assert selection["kind"].tolist() == ["positive", "hard_negative"]
    empty = select_patches(patches.iloc[:0], MiningConfig())
    assert empty.empty


def test_non_training_slides_are_refused():
    with pytest.raises(ValueError, match="non-training"):
        select_patches(table([("v1", 1, [0.9])], split="val"), MiningConfig())


def test_training_table_drops_val_and_test_slides_and_matches_by_id(tmp_path):
    scores = pd.DataFrame({"slide_id": ["b", "a", "c"], "x": [0, 0, 0], "y": [0, 0, 0], "score": [1.0, 2.0, 3.0]})
    labels = pd.DataFrame({"slide_id": ["a", "b", "c"], "label": [1, 0, 1], "split": ["train", "train", "val"]})
    joined = training_patch_table(scores, labels)
    assert sorted(zip(joined.slide_id, joined.label)) == [("a", 1), ("b", 0)]


def test_selection_quality_on_known_categories():
    patches = table([("t1", 1, [0.9, 0.8, 0.7, 0.2]), ("n1", 0, [0.9, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])])
    patches["truth"] = ["tumor", "normal", "tumor", "normal"] + ["lookalike", "normal"] + ["normal"] * 7 + ["lookalike"]
    selection = select_patches(patches, MiningConfig(neg_ratio=0.2, positives=PositiveSchedule(start=1.0, end=1.0)))
    report = selection_quality(patches, selection)
    assert report["counts"]["positive"] == 3 and report["counts"]["hard_negative"] == 2
    assert report["positive_precision"] == pytest.approx(2 / 3)
    assert report["hard_negative_composition"]["lookalike"] == pytest.approx(0.5)
    assert report["random_negative_composition"]["lookalike"] == pytest.approx(0.2)
    assert report["lookalike_enrichment"] == pytest.approx(2.5)
    assert report["hard_negative_on_tumor_errors"] == 0


def test_labels_need_a_split_and_binary_labels(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,tumor\n")
    with pytest.raises(InputError, match="split"):
        read_slide_labels(path)
    path.write_text("slide_id,label,fold_0\na,tumor,train\nb,NORMAL,val\nc,odd,test\n")
    with pytest.raises(InputError, match="odd"):
        read_slide_labels(path, fold=0)
    labels = read_slide_labels(path, fold=0, label_map={"odd": 0})
    assert labels["label"].tolist() == [1, 0, 0] and labels["split"].tolist() == ["train", "val", "test"]


def test_mine_command_writes_selection_of_training_slides_only(tmp_path, capsys):
    scores = tmp_path / "run" / "patch_scores"
    write_scores(scores, "t1", [0.9, 0.6, 0.2, 0.1])
    write_scores(scores, "n1", [0.8, 0.3, 0.1, 0.1, 0.05])
    write_scores(scores, "v1", [0.99, 0.99])
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,split\nt1,tumor,train\nn1,normal,train\nv1,tumor,val\n")
    out = tmp_path / "sel" / "selection.csv"
    cli.main(["--scores", str(tmp_path / "run"), "--labels", str(labels), "--out", str(out),
              "--mining.neg_ratio", "0.2", "--mining.positives.start", "1.0"])
    selection = read_selection(out)
    assert set(selection["slide_id"]) == {"t1", "n1"}
    assert selection.groupby("kind").size().to_dict() == {"hard_negative": 1, "positive": 2}
    assert "positive=2" in capsys.readouterr().out
    assert len(read_patch_scores(scores)) == 11


def test_mine_command_rejects_missing_scores(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,split\nt1,tumor,train\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="patch_scores"):
        cli.main(["--scores", str(tmp_path / "empty"), "--labels", str(labels), "--out", str(tmp_path / "s.csv")])


def twin_cohort(folder: Path) -> pd.DataFrame:
    """Tumor (only on tumor slides) and look-alikes (on both, fewer on normal slides) that the model scores alike.

    Writes one features file per slide under ``folder``; returns the training patch table with a ``truth`` column.
    """
    from features.store import write_features

    rng = np.random.default_rng(0)
    centres = {"normal": np.zeros(8), "lookalike": np.r_[10.0, np.zeros(7)], "tumor": np.r_[0.0, 10.0, np.zeros(6)]}
    frames = []
    for index in range(12):
        tumor_slide = index < 6
        truth = ["tumor"] * (8 if tumor_slide else 0) + ["lookalike"] * (10 if tumor_slide else 3)
        truth += ["normal"] * (60 - len(truth))
        probs = [0.9 if t != "normal" and tumor_slide else 0.8 if t == "lookalike" else 0.1 for t in truth]
        coords = np.stack([np.arange(60) * 64, np.zeros(60)], axis=1).astype(np.int64)
        vectors = np.stack([centres[t] + rng.normal(size=8) for t in truth]).astype(np.float32)
        slide_id = f"s{index:02d}"
        write_features(folder / f"{slide_id}.h5", coords, {"patch_size_level0": 64}, vectors, {})
        frames.append(pd.DataFrame({"slide_id": slide_id, "x": coords[:, 0], "y": 0, "score": logit(probs),
                                    "label": int(tumor_slide), "split": "train", "truth": truth}))
    return pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=0)  # order must not matter


def test_twin_test_drops_positive_candidates_that_have_a_normal_slide_twin(tmp_path):
    patches = twin_cohort(tmp_path / "features")
    config = MiningConfig(positives=PositiveSchedule(start=1.0, end=1.0), neg_ratio=0.05)
    plain = select_patches(patches, config)
    positives = plain[plain["kind"] == "positive"]
    assert set(positives["truth"]) == {"tumor", "lookalike"} and plain.attrs["positive_twins_removed"] is None
    twin_free = select_patches(patches, config, features=tmp_path / "features")
    positives = twin_free[twin_free["kind"] == "positive"]
    assert (positives["truth"] == "tumor").mean() >= 0.95 and len(positives) >= 40
    assert twin_free.attrs["positive_twins_removed"] >= 55
    # Hard negatives and plain negatives do not depend on the twin test.
    negatives = [frame.loc[frame["kind"] != "positive"].reset_index(drop=True) for frame in (plain, twin_free)]
    pd.testing.assert_frame_equal(*negatives)


def test_candidates_that_all_fail_the_twin_test_are_not_let_back_in(tmp_path):
    """A reference sample too small for k (few tumor patches in it) fails every candidate, tumor included.

    Keeping them all then would make every confident tumor-slide patch a positive (look-alikes included); the
    selection must instead fall back to a handful (one per tumor slide) and say why, label-free.
    """
    patches = twin_cohort(tmp_path / "features")
    config = MiningConfig(positives=PositiveSchedule(start=1.0, end=1.0), twins=TwinFilter(k=20, max_reference=60))
    with pytest.warns(UserWarning, match="passes the twin test"):
        selection = select_patches(patches, config, features=tmp_path / "features")
    positives = selection[selection["kind"] == "positive"]
    assert len(positives) == 6 and positives["slide_id"].nunique() == 6
    report = selection.attrs["twin_test"]
    assert report["passed"] == 0 and report["candidates"] == 108 == selection.attrs["positive_twins_removed"]
    assert "every one of the 108 positive candidates has a normal-slide twin" in report["warning"]
    # The same cohort with the full reference passes tumor, and says nothing.
    full = select_patches(patches, replace(config, twins=TwinFilter(k=20)), features=tmp_path / "features")
    assert full.attrs["twin_test"]["warning"] is None and full.attrs["twin_test"]["passed"] == 40


def test_positives_with_a_hard_negative_among_their_fellows_are_dropped(tmp_path):
    """Look-alike positives sit where the mined hard negatives (normal-slide look-alikes) are; tumor does not."""
    patches = twin_cohort(tmp_path / "features")
    config = MiningConfig(positives=PositiveSchedule(start=1.0, end=1.0), neg_ratio=0.05,
                          twins=TwinFilter(k=0, hard_negative_k=0))
    plain = select_patches(patches, config, features=tmp_path / "features")
    assert plain.attrs["positives_near_hard_negatives"] is None
    assert set(plain.loc[plain["kind"] == "hard_negative", "truth"]) == {"lookalike"}
    assert plain.loc[plain["kind"] == "positive", "truth"].value_counts().to_dict() == {"lookalike": 60, "tumor": 48}
    cleaned = select_patches(patches, replace(config, twins=TwinFilter(k=0, hard_negative_k=5)),
                             features=tmp_path / "features")
    positives = cleaned.loc[cleaned["kind"] == "positive", "truth"].value_counts().to_dict()
    assert positives["tumor"] >= 46 and positives["lookalike"] <= 24
    assert cleaned.attrs["positives_near_hard_negatives"] == 108 - sum(positives.values())
    # Negatives do not change; without features the test cannot run.
    negatives = [frame.loc[frame["kind"] != "positive"].reset_index(drop=True) for frame in (plain, cleaned)]
    pd.testing.assert_frame_equal(*negatives)
    assert select_patches(patches, replace(config, twins=TwinFilter(k=0)), features=None).attrs[
        "positives_near_hard_negatives"] is None


def test_near_hard_test_that_would_keep_fewer_positives_than_tumor_slides_is_not_applied(tmp_path):
    """With k as large as the positives, nearly every positive has a hard negative nearer than its k-th fellow:
    the test would keep fewer positives than the 6 training tumor slides, so it is not applied, and says so."""
    patches = twin_cohort(tmp_path / "features")
    config = MiningConfig(positives=PositiveSchedule(start=1.0, end=1.0), neg_ratio=0.05,
                          twins=TwinFilter(k=0, hard_negative_k=0))
    plain = select_patches(patches, config, features=tmp_path / "features")
    greedy = select_patches(patches, replace(config, twins=TwinFilter(k=0, hard_negative_k=107)),
                            features=tmp_path / "features")
    report = greedy.attrs["near_hard_test"]
    assert report["positives"] == 108 and report["positives"] - report["flagged"] < 6 and not report["applied"]
    assert "fewer than the 6 training tumor slides; not applied" in report["warning"]
    assert greedy.attrs["positives_near_hard_negatives"] == 0
    pd.testing.assert_frame_equal(plain, greedy)
    applied = select_patches(patches, replace(config, twins=TwinFilter(k=0, hard_negative_k=5)),
                             features=tmp_path / "features").attrs["near_hard_test"]
    assert applied["applied"] and applied["warning"] is None


def test_fewer_positives_than_tumor_slides_is_flagged(tmp_path):
    """Capped to 4 tumor positives for 6 training tumor slides: the selection says, label-free, that the refresh
    rests on few patches; uncapped, it says nothing."""
    patches = twin_cohort(tmp_path / "features")
    config = MiningConfig(positives=PositiveSchedule(start=1.0, end=1.0), neg_ratio=0.05, max_positives=4,
                          twins=TwinFilter(k=20, hard_negative_k=0))
    capped = select_patches(patches, config, features=tmp_path / "features")
    positives = capped[capped["kind"] == "positive"]
    assert len(positives) == 4 and set(positives["truth"]) == {"tumor"}
    count = capped.attrs["positive_count"]
    assert count["positives"] == 4 and count["tumor_slides"] == 6
    assert count["warning"].startswith("only 4 positive(s) for 6 training tumor slides")
    full = select_patches(patches, replace(config, max_positives=None), features=tmp_path / "features")
    assert full.attrs["positive_count"]["warning"] is None and full.attrs["positive_count"]["positives"] >= 40


def test_a_near_hard_test_that_flags_none_of_few_positives_is_applied_silently(tmp_path, monkeypatch):
    """Already fewer positives than tumor slides, and the near-hard test flags none: applying it changes nothing,
    so it must not report itself as skipped (the old line read 'would keep 4 of 4 positives ...; not applied')."""
    import mil.mining.mine as mine

    patches = twin_cohort(tmp_path / "features")
    config = MiningConfig(positives=PositiveSchedule(start=1.0, end=1.0), neg_ratio=0.05, max_positives=4,
                          twins=TwinFilter(k=20, hard_negative_k=5))
    monkeypatch.setattr(mine, "near_hard_negatives", lambda table, rows, *rest: np.zeros(len(rows), dtype=bool))
    report = select_patches(patches, config, features=tmp_path / "features").attrs["near_hard_test"]
    assert report == {"k": 5, "positives": 4, "flagged": 0, "applied": True, "warning": None}
    monkeypatch.setattr(mine, "near_hard_negatives", lambda table, rows, *rest: np.arange(len(rows)) == 0)
    report = select_patches(patches, config, features=tmp_path / "features").attrs["near_hard_test"]
    assert not report["applied"] and "would keep 3 of 4 positives, fewer than the 6" in report["warning"]


def test_mine_refuses_features_of_another_make_than_the_scored_model_read(tmp_path, capsys):
    """Patch scores record what made the features they came from; twin tests on another encoder's features of the
    same shape and tiling would decide which positives survive without a word."""
    from mil.patch_scores import read_patch_scores as read_patch_scores_file
    from mil.patch_scores import write_patch_scores

    def made_by(encoder: str) -> None:
        for path in (tmp_path / "features").glob("*.h5"):
            with h5py.File(path, "r+") as h5:
                h5["features"].attrs["encoder"] = encoder

    patches = twin_cohort(tmp_path / "features")
    for slide_id, group in patches.groupby("slide_id"):
        write_patch_scores(tmp_path / "run", slide_id, group[["x", "y"]].to_numpy(np.int64), group["score"].to_numpy(),
                           feature_settings={"encoder.name": "resnet50", "dtype": "float32"})
    labels = patches.groupby("slide_id")["label"].first().map({1: "tumor", 0: "normal"}).reset_index()
    labels.assign(split="train").to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "selection.csv"
    argv = ["--scores", str(tmp_path / "run"), "--labels", str(tmp_path / "labels.csv"), "--out", str(out),
            "--features", str(tmp_path / "features")]
    made_by("vit_large")
    with pytest.raises(InputError, match="made with encoder.name 'vit_large' where the patch scores .* 'resnet50'"):
        cli.main(argv)
    assert not out.exists()
    made_by("resnet50")
    cli.main(argv)
    assert (read_selection(out)["kind"] == "positive").any()
    # A folder mixed by two runs (one slide rescored from other features) is refused too.
    coords, scores = read_patch_scores_file(tmp_path / "run" / "patch_scores" / "s00.h5")
    write_patch_scores(tmp_path / "run", "s00", coords, scores, feature_settings={"encoder.name": "vit_large"})
    with pytest.raises(InputError, match="patch scores from features of different makes"):
        cli.main(argv)


def test_twin_test_needs_features_for_every_scored_patch(tmp_path):
    patches = twin_cohort(tmp_path / "features")
    patches.loc[patches.index[0], "x"] = 99_999
    with pytest.raises(InputError, match="different tilings"):
        select_patches(patches, MiningConfig(), features=tmp_path / "features")


def test_twin_test_caps_the_candidates_it_tests(tmp_path):
    from mil.mining.twins import TwinFilter, twin_test

    patches = twin_cohort(tmp_path / "features").reset_index(drop=True)
    candidates = np.flatnonzero(patches["label"].to_numpy() == 1)
    full = twin_test(patches, candidates, tmp_path / "features", TwinFilter()).free
    capped = twin_test(patches, candidates, tmp_path / "features", TwinFilter(max_candidates=50)).free
    top = np.argsort(-patches["score"].to_numpy()[candidates], kind="stable")[:50]
    assert np.array_equal(capped[top], full[top]) and not np.delete(capped, top).any()


def mimic_table() -> pd.DataFrame:
    """A confident slide model on look-alikes that mimic tumor: above 0.3 on every slide, commoner on tumor slides.

    Four tumor slides: 4 tumor patches (0.93-0.99), 12 look-alikes (0.6-0.9), 24 normal patches (0.4, above
    the fixed threshold too: the slide is called tumor). Four normal slides: 2 look-alikes (0.65, 0.91), 38 normal.
    """
    rows = []
    for index in range(4):
        tumor = list(np.linspace(0.93, 0.99, 4)) + list(np.linspace(0.6, 0.9, 12)) + [0.4] * 24
        rows.append((f"t{index}", 1, tumor))
        rows.append((f"n{index}", 0, [0.65, 0.91] + [0.05] * 38))
    patches = table(rows)
    patches["truth"] = np.where(patches["score"] > logit(0.92), "tumor",
                                np.where(patches["score"] > logit(0.5), "lookalike", "normal"))
    return patches


def test_normal_calibrated_threshold_keeps_lookalikes_the_fixed_threshold_admits():
    patches = mimic_table()
    everything = PositiveSchedule(start=1.0, end=1.0)
    fixed = select_patches(patches, MiningConfig(positives=everything))
    assert (fixed["kind"] == "positive").sum() == 160  # every tumor-slide patch passes 0.3
    assert selection_quality(patches, fixed)["positive_precision"] == pytest.approx(0.1)
    calibrated = select_patches(patches, MiningConfig(positives=everything, normal_quantile=0.999))
    positives = calibrated[calibrated["kind"] == "positive"]
    assert len(positives) == 16 and set(positives["truth"]) == {"tumor"}
    probs = sigmoid(patches["score"].to_numpy())
    assert normal_calibrated_threshold(probs, patches["label"].to_numpy(), 0.3, 0.999) == pytest.approx(0.91)
    assert normal_calibrated_threshold(probs, patches["label"].to_numpy(), 0.95, 0.999) == 0.95  # never lower
    assert normal_calibrated_threshold(probs, patches["label"].to_numpy(), 0.3, None) == 0.3


def test_candidate_pool_warns_when_most_of_a_tumor_slide_is_a_candidate(tmp_path, capsys):
    patches = mimic_table()
    probs, labels = sigmoid(patches["score"].to_numpy()), patches["label"].to_numpy()
    pool = candidate_pool(labels, probs, 0.3, max_share=0.2)
    assert pool["candidate_share"] == pytest.approx(1.0) and pool["normal_share_above_threshold"] == pytest.approx(0.05)
    assert "100% of tumor-slide patches" in pool["warning"]
    assert candidate_pool(labels, probs, 0.92, max_share=0.2)["warning"] is None  # 16 of 160: plausible
    # The command says so on stdout and in selection_quality.json, without annotations.
    scores = tmp_path / "run" / "patch_scores"
    for slide_id, group in patches.groupby("slide_id"):
        write_scores(scores, slide_id, sigmoid(group["score"].to_numpy()))
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("slide_id,label,split\n" + "".join(
        f"{s},{'tumor' if s.startswith('t') else 'normal'},train\n" for s in sorted(set(patches["slide_id"]))))
    out = tmp_path / "selection.csv"
    cli.main(["--scores", str(tmp_path / "run"), "--labels", str(labels_csv), "--out", str(out)])
    assert "warning: positive candidates are 100% of tumor-slide patches" in capsys.readouterr().out
    report = json.loads((tmp_path / "selection_quality.json").read_text())
    assert report["candidate_pool"]["candidates"] == 160 and report["candidate_pool"]["warning"]
    cli.main(["--scores", str(tmp_path / "run"), "--labels", str(labels_csv), "--out", str(out),
              "--mining.normal_quantile", "0.999"])
    printed = capsys.readouterr().out
    assert "warning: positive candidates" not in printed
    assert "warning: only 3 positive(s) for 4 training tumor slides" in printed  # the raised threshold keeps few
    report = json.loads((tmp_path / "selection_quality.json").read_text())
    assert report["candidate_pool"]["candidates"] == 16 and report["candidate_pool"]["warning"] is None
    assert report["positive_count"] == {"positives": 3, "tumor_slides": 4, "warning": report["positive_count"]["warning"]}
    with pytest.raises(InputError, match="normal_quantile"):
        cli.main(["--scores", str(tmp_path / "run"), "--labels", str(labels_csv), "--out", str(out),
                  "--mining.normal_quantile", "99.9"])


def test_positives_from_few_of_the_tumor_slides_sites_are_flagged():
    rows = [("ta", 1, [0.9, 0.9]), ("tb", 1, [0.1, 0.1]), ("tc", 1, [0.1, 0.1]), ("na", 0, [0.5, 0.2, 0.1, 0.1]),
            ("nb", 0, [0.6, 0.2]), ("nc", 0, [0.7, 0.2])]
    config = MiningConfig(neg_ratio=0.5, positives=PositiveSchedule(start=1.0), positives_by_site=False)

    def mix(rows):
        patches = table(rows)
        patches["site"] = patches["slide_id"].str[1]
        return select_patches(patches, config).attrs["site_mix"]

    one = mix(rows)
    assert one["positives"] == {"a": 2} and one["tumor_slide_sites"] == ["a", "b", "c"]
    assert one["hard_negatives"] == {"a": 2, "b": 1, "c": 1} and one["overlap"] == pytest.approx(0.5)
    assert one["warning"].startswith("positives come from 1 of the 3 sites of the training tumor slides (a 2)")
    assert one["warning"].endswith("set mining.positives_by_site auto or true") and one["by_site"] is False
    rows[1] = ("tb", 1, [0.9, 0.1])
    assert mix(rows)["warning"] is None  # two of the three sites


def test_mine_reads_sites_from_the_labels_and_warns_in_one_line(tmp_path, capsys):
    scores = tmp_path / "run" / "patch_scores"
    write_scores(scores, "t1", [0.9, 0.6, 0.2, 0.1])
    write_scores(scores, "t2", [0.2, 0.1])
    write_scores(scores, "n1", [0.8, 0.7, 0.1, 0.1, 0.05])
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,split,site\nt1,tumor,train, A\nt2,tumor,train,B\nn1,normal,train,B\n")
    out = tmp_path / "selection.csv"
    cli.main(["--scores", str(tmp_path / "run"), "--labels", str(labels), "--out", str(out),
              "--mining.positives_by_site", "false"])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: positives come")]
    assert len(warnings) == 1 and "1 of the 2 sites of the training tumor slides (A 1)" in warnings[0]
    report = json.loads((tmp_path / "selection_quality.json").read_text())["site_mix"]
    assert report["tumor_slide_sites"] == ["A", "B"] and report["hard_negatives"] == {"B": 1} and report["overlap"] == 0
    write_scores(scores, "t2", [0.4, 0.1])  # site B now has a candidate, ranked below site A's
    cli.main(["--scores", str(tmp_path / "run"), "--labels", str(labels), "--out", str(out)])  # auto by default
    printed = capsys.readouterr().out
    assert "warning: positives come" not in printed and printed.count("note: positives taken within each site") == 1
    assert json.loads((tmp_path / "selection_quality.json").read_text())["site_mix"]["positives"] == {"A": 1, "B": 1}
    labels.write_text("slide_id,label,split\nt1,tumor,train\nt2,tumor,train\nn1,normal,train\n")
    cli.main(["--scores", str(tmp_path / "run"), "--labels", str(labels), "--out", str(out)])
    assert "warning: positives come" not in capsys.readouterr().out
    assert json.loads((tmp_path / "selection_quality.json").read_text())["site_mix"] is None


def test_positives_by_site_reads_the_site_column_and_spans_the_sites():
    patches = table([("ta", 1, [0.9, 0.9, 0.9, 0.9]), ("tb", 1, [0.5, 0.4]), ("na", 0, [0.5, 0.2]),
                     ("nb", 0, [0.6, 0.2])])
    patches["site"] = patches["slide_id"].str[1]
    config = MiningConfig(neg_ratio=0.5, positives=PositiveSchedule(start=0.5), positives_by_site=False)
    by_score = select_patches(patches, config)
    assert set(by_score.query("kind == 'positive'")["slide_id"]) == {"ta"} and by_score.attrs["site_mix"]["warning"]
    by_site = select_patches(patches, replace(config, positives_by_site=True))
    assert by_site.query("kind == 'positive'")["slide_id"].tolist() == ["ta", "ta", "tb"]
    assert by_site.attrs["site_mix"]["warning"] is None and by_site.attrs["site_mix"]["note"] is None


def test_positives_by_site_auto_switches_only_when_the_ranked_positives_miss_most_sites():
    patches = table([("ta", 1, [0.9, 0.9, 0.9, 0.9]), ("tb", 1, [0.5, 0.4]), ("na", 0, [0.5, 0.2]),
                     ("nb", 0, [0.6, 0.2])])
    patches["site"] = patches["slide_id"].str[1]
    auto = MiningConfig(neg_ratio=0.5, positives=PositiveSchedule(start=0.5))
    assert auto.positives_by_site == "auto"
    switched = select_patches(patches, auto)
    assert switched.query("kind == 'positive'")["slide_id"].tolist() == ["ta", "ta", "tb"]
    mix = switched.attrs["site_mix"]
    assert mix["by_site"] is True and mix["by_score"] == {"a": 3} and mix["warning"] is None
    assert mix["note"] == ("positives taken within each site (a 2, b 1): ranked over the cohort they came from 1 of "
                           "the 2 training tumor slides' sites (a 3)")
    patches.loc[patches["slide_id"] == "tb", "score"] = 5.0  # site b now ranks first: both sites among the top
    patches = pd.concat([patches, table([("tc", 1, [0.9, 0.9, 0.9, 0.9])]).assign(site="a")], ignore_index=True)
    kept = select_patches(patches, auto)
    assert kept.equals(select_patches(patches, replace(auto, positives_by_site=False)))
    assert kept.attrs["site_mix"]["by_site"] is False and kept.attrs["site_mix"]["note"] is None
