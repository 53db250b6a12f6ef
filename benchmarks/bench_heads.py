"""Heads on stored embeddings vs end-to-end fine-tuning of the encoder, on the same labelled patches.

A synthetic MIDOG-style point set (mitosis-like figures, imposters, random and unlabeled-image negatives) is
embedded once through ``features extract --coords`` with a random-init ResNet-18. Then, on the training
patches:

- heads: a linear and an MLP head trained with :func:`features.heads.train.train_head` (timed in full);
- fine-tuning: the same encoder with a linear layer, trained end to end on the patch pixels (AdamW, batch 32).
  Only a few steps are run after one warm-up step; seconds per epoch are extrapolated from the mean step time
  and multiplied by the head's epoch count (stated in the ``note`` column).

``ratio_per_epoch_vs_linear_head`` compares seconds per epoch over the same training patches (an epoch count
is a choice: heads here train 300 steps minimum, fine-tuning usually fewer epochs); the one-off embedding time
is reported too, since a head is only cheap once the embeddings exist.
``python benchmarks/bench_heads.py [OUT]`` runs it alone.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from features.encoders import EncoderConfig, build_encoder
from features.heads.data import load_embeddings
from features.heads.embed import embed_points
from features.heads.points import PointSampling
from features.heads.train import HeadConfig, evaluate, train_head
from features.patches import PatchDataset, items_for_slide
from features.store import find_feature_files, read_bag
from features.synth.points import PointConfig, write_point_cohort
from features.tiling import Geometry

ENCODER = EncoderConfig(name="resnet18", seed=0)
SAMPLING = PointSampling(target_mpp=0.25, patch_size=64, random_per_image=40, unlabeled_per_image=40)
FINETUNE_STEPS = 4
BATCH = 32


def finetune_step_seconds(data, features_dir: Path, image_dir: Path) -> float:
    """Mean seconds of one end-to-end training step (forward, backward, AdamW) over the training patches."""
    encoder = build_encoder(ENCODER, patch_size=SAMPLING.patch_size)
    model = nn.Sequential(encoder.model, nn.Linear(encoder.dim, 2)).train().requires_grad_(True)
    files = find_feature_files(features_dir)
    items, labels = [], []
    for image, rows in data.table.groupby("image", sort=False).groups.items():
        geometry = Geometry.from_attrs(read_bag(files[image]).coord_attrs)
        coords = data.table.loc[rows, ["x", "y"]].to_numpy(np.int64)
        items += items_for_slide(image_dir / data.table.loc[rows[0], "file_name"], coords, geometry)
        labels += data.labels[np.asarray(rows)].tolist()
    loader = DataLoader(PatchDataset(items, encoder.transform), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.tensor(labels)
    times = []
    for step, (images, index) in enumerate(loader):
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(images), target[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - start)
        if len(times) == FINETUNE_STEPS:
            break
    return float(np.mean(times))


def run(out_dir: str | Path) -> list[dict]:
    torch.manual_seed(0)
    out_dir = Path(out_dir)
    cohort = write_point_cohort(out_dir / "points", PointConfig(n_images=8, width=768, height=768), progress=False)
    shutil.rmtree(out_dir / "embeddings", ignore_errors=True)  # time a fresh embedding, not a cache hit
    start = time.perf_counter()
    features_dir, table = embed_points(cohort.coco_json, cohort.images, out_dir / "embeddings", ENCODER, SAMPLING)
    embed_seconds = time.perf_counter() - start
    table.loc[table["split"] == "unlabeled", "split"] = "train"
    data = load_embeddings(features_dir, table)
    splits = {name: data.split(name) for name in ("train", "val", "test")}
    train = splits["train"]
    rows = []
    for name, config in (("linear head", HeadConfig()), ("MLP head (256)", HeadConfig(hidden=256))):
        trained = train_head(train, config)
        metrics = evaluate(trained, splits)
        epochs = trained.steps / math.ceil(len(train) / config.batch_size)
        rows.append({"method": name, "train_patches": len(train), "epochs": epochs, "seconds": trained.seconds,
                     "seconds_per_epoch": trained.seconds / epochs, "test_auroc": metrics["test_auroc"],
                     "note": "measured (torch threads: 1)"})
    step = finetune_step_seconds(train, features_dir, cohort.images)
    epoch_seconds = step * math.ceil(len(train) / BATCH)
    rows.append({"method": "end-to-end fine-tuning (ResNet-18)", "train_patches": len(train),
                 "epochs": rows[0]["epochs"], "seconds": epoch_seconds * rows[0]["epochs"],
                 "seconds_per_epoch": epoch_seconds, "test_auroc": float("nan"),
                 "note": f"{FINETUNE_STEPS} steps of batch {BATCH} at {step:.2f} s/step, extrapolated to the "
                         f"head's epochs (torch threads: {torch.get_num_threads()})"})
    for row in rows:
        row["ratio_per_epoch_vs_linear_head"] = row["seconds_per_epoch"] / rows[0]["seconds_per_epoch"]
    rows.append({"method": "embedding once (extraction, ResNet-18)", "train_patches": len(data), "epochs": 1,
                 "seconds": embed_seconds, "seconds_per_epoch": embed_seconds, "test_auroc": float("nan"),
                 "note": "all splits incl. val/test, measured",
                 "ratio_per_epoch_vs_linear_head": embed_seconds / rows[0]["seconds_per_epoch"]})
    return rows


if __name__ == "__main__":
    import pandas as pd

    print(pd.DataFrame(run(Path(sys.argv[1] if len(sys.argv) > 1 else "bench_out/heads"))).to_string(index=False))
