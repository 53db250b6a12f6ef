"""Embeddings for labelled patches: image folders through the encoder directly, point candidates through the
shared extraction code (so D4 averaging, stored views and the feature-store layout are the same as for slides).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from features.encoders import Encoder, EncoderConfig, default_tag, file_sha256
from features.errors import InputError
from features.heads.labels import ImageFolderDataset
from features.heads.points import PointSampling, point_table, read_coco_images, read_coco_points
from features.store import atomic_path


@torch.no_grad()
def embed_images(paths: list[str], encoder: Encoder, batch_size: int = 32, num_workers: int = 0) -> np.ndarray:
    """(N, dim) float32 embeddings of image files, in order."""
    loader = DataLoader(ImageFolderDataset(paths, encoder.transform), batch_size=batch_size, num_workers=num_workers)
    parts = [encoder.model(images).float().numpy() for images, _ in tqdm(loader, desc="embed", unit="batch")]
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), dtype=np.float32)


def timed_embed(paths: list[str], encoder: Encoder, batch_size: int = 32) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    features = embed_images(paths, encoder, batch_size)
    return features, time.perf_counter() - start


def encoder_tag(config: EncoderConfig) -> str:
    """The features/<tag>/ folder extraction will write for ``config`` (same rule as the encoder factory)."""
    if config.tag:
        return config.tag
    return default_tag(config, file_sha256(config.weights) if config.weights else "")


def embed_points(coco_json: str | Path, image_dir: str | Path, work: str | Path, encoder: EncoderConfig,
                 sampling: PointSampling, tta: str = "none", views: int = 0, batch_size: int = 32,
                 num_workers: int = 0, splits: str | Path | None = None,
                 categories: dict[str, int] | None = None, split_seed: int = 0) -> tuple[Path, pd.DataFrame]:
    """Build the candidate table of a COCO point set and embed it with ``features extract --coords``.

    Returns (features folder, table). The work folder is named after a digest of the table and the settings,
    so a rerun with the same inputs reuses finished files and a changed table never meets stale ones.
    """
    images = read_coco_images(coco_json, image_dir, splits, split_seed)
    table = point_table(read_coco_points(coco_json, categories), images, sampling)
    image_dir = Path(image_dir)
    slides = pd.DataFrame({"slide_id": images["file_name"].map(lambda f: Path(f).stem),
                           "path": [str((image_dir / f).resolve()) for f in images["file_name"]],
                           "mpp": images["mpp"]})
    missing = [p for p in slides["path"] if not Path(p).is_file()]
    if missing:
        raise InputError(f"{missing[0]}: image listed in {coco_json} not found; pass the folder as --data.image_dir")
    coords = table[["image", "x", "y"]].rename(columns={"image": "slide_id"})
    tag = encoder_tag(encoder)
    key = json.dumps({"coords": coords.to_csv(index=False), "tag": tag, "encoder": dataclasses.asdict(encoder),
                      "tta": tta, "views": views, "mpp": sampling.target_mpp, "patch": sampling.patch_size},
                     sort_keys=True)
    out = Path(work) / f"points-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("slides.csv", slides), ("coords.csv", coords), ("patches.csv", table)):
        if not (out / name).is_file():
            with atomic_path(out / name) as tmp:
                frame.to_csv(tmp, index=False)
    from features.extraction.cli import run_extract
    from features.extraction.extract import ExtractOptions

    options = ExtractOptions(slides=str(out / "slides.csv"), coords=str(out / "coords.csv"), out=str(out),
                             mpp=sampling.target_mpp, patch_size=sampling.patch_size, tta=tta, views=views,
                             batch_size=batch_size, num_workers=num_workers, encoder=encoder)
    threads = torch.get_num_threads()  # extraction sets the process-wide thread count; put it back afterwards
    try:
        run_extract(options)  # the whole encoder config travels: hub, pooling, normalisation and checksum included
    finally:
        torch.set_num_threads(threads)
    return out / "features" / tag, table
