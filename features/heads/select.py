"""``features select``: rank candidate encoders by a cheap proxy task before embedding a whole cohort.

Each candidate embeds the same small labelled image set once; a linear probe (logistic regression on
standardised embeddings) and a kNN classifier (cosine distance) are cross-validated on those embeddings with
stratified folds. The ranking is by linear-probe balanced accuracy, since that is what a frozen-embedding head
will see; kNN shows how much the raw geometry of the space already separates the classes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from jsonargparse import ActionConfigFile, ArgumentParser
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from features.encoders import EncoderConfig, build_encoder
from features.errors import InputError
from features.heads.data import encode_labels
from features.heads.embed import embed_images
from features.heads.labels import folder_table
from features.store import atomic_path


@dataclass
class ProxyTask:
    images: str = ""
    """Root/<class>/*.png: a few dozen labelled patches per class."""
    max_per_class: int | None = None
    """Cap for speed (the first images of each class, sorted by name)."""
    folds: int = 5
    """Cross-validation folds of the proxy task."""
    knn_k: int = 5
    """Neighbours of the k-NN probe."""
    batch_size: int = 32
    """Images per forward pass."""
    seed: int = 0
    """Seeds the folds."""


def proxy_table(task: ProxyTask) -> pd.DataFrame:
    table = folder_table(task.images)
    if task.max_per_class:
        table = table.groupby("label", sort=True).head(task.max_per_class).reset_index(drop=True)
    return table


def cross_validate(features: np.ndarray, labels: np.ndarray, folds: int, knn_k: int, seed: int) -> dict[str, float]:
    """Mean and spread of balanced accuracy over stratified folds, for a linear probe and for kNN."""
    smallest = int(np.bincount(labels).min())
    if smallest < 2:
        raise InputError("proxy set: every class needs at least 2 images for cross-validation")
    splitter = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    probes = {
        "linear": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "knn": KNeighborsClassifier(n_neighbors=min(knn_k, len(labels) - 1), metric="cosine"),
    }
    result = {}
    for name, probe in probes.items():
        scores = cross_val_score(probe, features, labels, cv=splitter, scoring="balanced_accuracy")
        result[f"{name}_bacc"], result[f"{name}_std"] = float(scores.mean()), float(scores.std())
    return result


def rank_encoders(candidates: list[EncoderConfig], task: ProxyTask) -> pd.DataFrame:
    """One row per candidate, best first (rank 1)."""
    if not candidates:
        raise InputError("no candidate encoders; list them under `candidates:` in the config")
    table = proxy_table(task)
    labels, _ = encode_labels(table["label"])
    rows = []
    for config in candidates:
        encoder = build_encoder(config)
        start = time.perf_counter()
        features = embed_images(table["image"].tolist(), encoder, task.batch_size)
        seconds = time.perf_counter() - start
        rows.append({"encoder": config.name, "tag": encoder.tag, "weights": config.weights or "", "dim": encoder.dim,
                     **cross_validate(features, labels, task.folds, task.knn_k, task.seed),
                     "embed_seconds": seconds, "images_per_second": len(table) / max(seconds, 1e-9),
                     "n_images": len(table)})
    ranked = pd.DataFrame(rows).sort_values(["linear_bacc", "knn_bacc"], ascending=False, kind="stable")
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    return ranked.reset_index(drop=True)


def select_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="features select", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with candidates: and proxy:")
    parser.add_argument("--candidates", type=list[EncoderConfig], default=[], help="encoders to compare")
    parser.add_class_arguments(ProxyTask, "proxy")
    parser.add_argument("--out", type=str, required=True, help="folder for select.csv")
    return parser


def main(argv: list[str]) -> None:
    parser = select_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    if not init.proxy.images:
        raise InputError("no proxy set: pass --proxy.images ROOT (root/<class>/*.png)")
    ranked = rank_encoders(init.candidates, init.proxy)
    shown = ["rank", "tag", "dim", "linear_bacc", "linear_std", "knn_bacc", "embed_seconds"]
    print(ranked[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "select.csv") as tmp:
        ranked.assign(proxy=init.proxy.images).to_csv(tmp, index=False)
    print(f"best: {ranked.iloc[0]['tag']}; wrote {out / 'select.csv'}")
