"""The shipped Camelyon16 split: the challenge's 270 training and 129 test slides, validation from the training set."""

from __future__ import annotations

from pathlib import Path

from mil.data.labels import read_labels

SPLIT = Path(__file__).resolve().parents[2] / "configs" / "camelyon16" / "labels.csv"


def test_camelyon16_split_has_the_published_counts_and_reads_as_a_labels_csv():
    frame = read_labels(SPLIT)
    counts = frame.groupby(["split", "label"]).size().to_dict()
    assert len(frame) == 399
    assert counts == {("train", 0): 127, ("train", 1): 89, ("val", 0): 32, ("val", 1): 22,
                      ("test", 0): 80, ("test", 1): 49}
    # training slides carry their label in their name; test slides are only named test_NNN
    development = frame[frame["split"] != "test"]
    assert (development["slide_id"].str.startswith("tumor_") == (development["label"] == 1)).all()
    assert set(frame.loc[frame["split"] == "test", "slide_id"].str[:5]) == {"test_"}
    assert "test_049" not in frame.index  # the test duplicate, left out as usual
    assert frame.loc["test_001", "label"] == 1 and frame.loc["test_003", "label"] == 0
