"""``features heads``: train a small patch-level head on stored embeddings, or ablate feature-space augmentation.

Data come from one of three sources (``--data.*``): a features folder plus a patch table, an image folder
(``root/<class>/*.png``) embedded on the fly, or MIDOG-style COCO points embedded through the extraction code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import pandas as pd
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from features.encoders import EncoderConfig
from features.errors import InputError
from features.heads.data import EmbeddingSet, encode_labels, load_embeddings
from features.heads.labels import assign_splits, folder_table, read_table, stratified_splits
from features.heads.points import PointSampling
from features.heads.train import HeadConfig, evaluate, predict_proba, save_head, train_head
from features.store import atomic_path


@dataclass
class DataSource:
    """Where the labelled patches and their embeddings come from (give one of the three sources)."""

    embeddings: str | None = None
    """Features folder written by `features extract` (with --coords)."""
    table: str | None = None
    """Patch table CSV: image,x,y,label,source[,split]."""
    images: str | None = None
    """Image folder root/<class>/*.png, embedded with `encoder`."""
    points: str | None = None
    """MIDOG-style COCO JSON, embedded with `encoder` through extraction."""
    image_dir: str | None = None
    """The folder holding the COCO images (their mpp is read there when the JSON lacks it)."""
    splits: str | None = None
    """CSV file_name,split (train/val/test/unlabeled); default: the JSON's, else a seeded split by image."""
    categories: dict[str, int] | None = None
    """COCO category name -> label (default: MIDOG++ names, mitotic figure = 1)."""
    work_dir: str | None = None
    """Where point embeddings are written (default: next to --out)."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The encoder that embeds images or points (timm name, weights, seed)."""
    sampling: PointSampling = field(default_factory=PointSampling)
    """Where candidate patches go around points."""
    tta: Literal["none", "d4"] = "none"
    """D4: mean over the 8 rotations/flips (rotation-invariant embeddings)."""
    views: int = 0
    """Augmented views stored per patch for feature-space augmentation."""
    batch_size: int = 32
    """Images per forward pass."""
    seed: int = 0
    """Seeds splits and sampling."""


def build_parser(prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_class_arguments(DataSource, "data")
    parser.add_class_arguments(HeadConfig, "head")
    parser.add_argument("--out", type=str, required=True, help="output folder")
    return parser


def load_data(source: DataSource, out: str | Path | None = None) -> EmbeddingSet:
    """The labelled embeddings of one source, with a train/val/test ``split`` column."""
    if source.embeddings and source.table:
        table = assign_splits(read_table(source.table), seed=source.seed)
        return load_embeddings(source.embeddings, table)
    if source.images:
        from features.encoders import build_encoder
        from features.heads.embed import embed_images

        table = stratified_splits(folder_table(source.images), seed=source.seed)
        encoder = build_encoder(source.encoder)
        features = embed_images(table["image"].tolist(), encoder, source.batch_size)
        labels, classes = encode_labels(table["label"])
        return EmbeddingSet(features, labels, table, None, classes)
    if source.points and source.image_dir:
        from features.heads.embed import embed_points

        work = Path(source.work_dir or Path(out or ".") / "embeddings")
        features_dir, table = embed_points(source.points, source.image_dir, work, source.encoder, source.sampling,
                                           tta=source.tta, views=source.views, batch_size=source.batch_size,
                                           splits=source.splits, categories=source.categories,
                                           split_seed=source.seed)
        table.loc[table["split"] == "unlabeled", "split"] = "train"  # unlabeled-image negatives train only
        return load_embeddings(features_dir, table)
    raise InputError("no data: pass --data.embeddings DIR with --data.table CSV, or --data.images ROOT, "
                     "or --data.points COCO.json with --data.image_dir DIR")


ABLATION = {  # name -> what changes from the plain head
    "plain": dict(view_sampling=False, noise_std=0.0, mixup_alpha=0.0),
    "views": dict(view_sampling=True, noise_std=0.0, mixup_alpha=0.0),
    "noise": dict(view_sampling=False, noise_std=0.2, mixup_alpha=0.0),
    "views+noise": dict(view_sampling=True, noise_std=0.2, mixup_alpha=0.0),
    "views+noise+mixup": dict(view_sampling=True, noise_std=0.2, mixup_alpha=0.2),
}


def ablation(data: EmbeddingSet, head: HeadConfig, seeds: int = 1) -> pd.DataFrame:
    """Same data, same head size, with and without each feature-space augmentation; mean over ``seeds``."""
    splits = {name: data.split(name) for name in ("train", "val", "test") if (data.table["split"] == name).any()}
    rows = []
    for name, change in ABLATION.items():
        if change["view_sampling"] and data.views is None:
            continue  # nothing to sample from: the row would repeat another
        for seed in range(seeds):
            trained = train_head(splits["train"], replace(head, seed=head.seed + seed, **change))
            metrics = evaluate(trained, {k: v for k, v in splits.items() if k != "train"})
            rows.append({"variant": name, "seed": head.seed + seed, "seconds": trained.seconds, **metrics})
    table = pd.DataFrame(rows)
    return table.groupby("variant", sort=False).mean(numeric_only=True).drop(columns="seed").reset_index()


def predictions(trained, data: EmbeddingSet) -> pd.DataFrame:
    probs = predict_proba(trained.module, data.features)
    keep = [c for c in ("image", "x", "y", "label", "source", "split", "cx", "cy") if c in data.table.columns]
    table = data.table[keep].copy()
    if probs.shape[1] == 2:
        table["score"] = probs[:, 1]
    else:
        for index, name in enumerate(data.classes):
            table[f"prob_{name}"] = probs[:, index]
    return table


def heads_parser() -> ArgumentParser:
    parser = build_parser("features heads", __doc__.splitlines()[0])
    parser.add_argument("--ablation", action=ActionYesNo, default=False,
                        help="train with and without view sampling / noise / mixup on the same data; print a table")
    parser.add_argument("--ablation_seeds", type=int, default=1, help="seeds averaged per ablation variant")
    return parser


def main(argv: list[str]) -> None:
    parser = heads_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    out = Path(cfg.out)
    data = load_data(init.data, out)
    head: HeadConfig = init.head
    if cfg.ablation:
        table = ablation(data, head, cfg.ablation_seeds)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "ablation.csv") as tmp:
            table.to_csv(tmp, index=False)
        print(f"wrote {out / 'ablation.csv'}")
        return
    splits = {name: data.split(name) for name in ("train", "val", "test") if (data.table["split"] == name).any()}
    trained = train_head(splits["train"], head)
    metrics = evaluate(trained, splits)
    save_head(trained, out, {"data": asdict(init.data), "n_views": 0 if data.views is None else int(data.views.shape[0])})
    with atomic_path(out / "predictions.csv") as tmp:
        predictions(trained, data).to_csv(tmp, index=False)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))
    print(f"trained in {trained.seconds:.2f}s ({trained.steps} steps); wrote {out}/head.safetensors, predictions.csv")
