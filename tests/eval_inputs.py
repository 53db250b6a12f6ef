"""Fabricated but real inputs for the evaluation tests: predictions CSVs and patch score files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd


def write_predictions(path: str | Path, labels, scores, split: str = "test", prefix: str | None = None) -> Path:
    """A predictions CSV (slide_id,label,score,split) as `mil test` writes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = prefix or split
    pd.DataFrame({"slide_id": [f"{prefix}_{i:03d}" for i in range(len(labels))], "label": list(labels),
                  "score": list(scores), "split": split}).to_csv(path, index=False)
    return path


def noisy_predictions(n: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels and sigmoid scores whose class separation is ``separation`` logits."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    scores = 1.0 / (1.0 + np.exp(-(separation * (labels - 0.5) + rng.normal(size=n))))
    return labels, scores


def write_patch_scores(path: str | Path, coords: np.ndarray, scores: np.ndarray,
                       attention: np.ndarray | None = None) -> Path:
    """A patch_scores/<slide_id>.h5 file as `mil test` writes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        h5.create_dataset("scores", data=np.asarray(scores, dtype=np.float32))
        if attention is not None:
            h5.create_dataset("attention", data=np.asarray(attention, dtype=np.float32))
    return path


def asap_xml(path: str | Path, polygons: dict[str, list[list[tuple[float, float]]]]) -> Path:
    """An ASAP (Camelyon16) annotation file; ``polygons`` maps a group name to a list of point lists."""
    parts = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    index = 0
    for group, shapes in polygons.items():
        for points in shapes:
            parts.append(f'<Annotation Name="Annotation {index}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
            parts.append("<Coordinates>")
            parts += [f'<Coordinate Order="{j}" X="{x}" Y="{y}" />' for j, (x, y) in enumerate(points)]
            parts += ["</Coordinates>", "</Annotation>"]
            index += 1
    parts += ["</Annotations>", "<AnnotationGroups>"]
    parts += [f'<Group Name="{g}" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>' for g in polygons]
    parts += ["</AnnotationGroups>", "</ASAP_Annotations>"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
