"""Cost of one mining round at scale, from stored random embeddings: how each stage grows with the cohort.

Cohorts of 50, 100 and 200 slides (``PATCHES`` patches of ``DIM``-d float16 embeddings each, ResNet-18-sized; 80 %
training slides) run the stages of a round that need no pixels, each timed as the command a user runs:

- ``read_bags``: reading every training bag from HDF5 once (the I/O floor of a MIL epoch);
- ``mil_epoch``: one training epoch of ABMIL with the ranking loss over the training bags (Lightning, streamed
  bags, no validation), after a ``mil fit`` that is not timed and only provides the checkpoint for the next stages;
- ``score``: ``mil predict --data.predict_split train`` (patch scores of every training patch);
- ``mine``: ``mil mine`` with the twin test (pseudo-labels, hard negatives, selection file).

Each stage's seconds are fitted as ``a + b x patches`` over the three cohorts, and the fit predicts a
Camelyon16-sized round (270 training/validation slides x ``C16_PATCHES_PER_SLIDE``). Extraction and fine-tuning
need pixels: their scaling is in ``bench_extract`` (patches/s) and ``bench_finetune`` (cost vs ``neg_ratio``).

Usage: ``python benchmarks/bench_scale.py [OUT]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

SIZES = (50, 100, 200)
PATCHES, DIM = 2000, 512
C16_SLIDES, C16_PATCHES_PER_SLIDE = 270, 10_000  # Camelyon16 training + validation at 0.5 um/px, 224 px (approx.)
MIL_ARGS = ["--config", "configs/demo/mil_abmil_ranking.yaml", "--trainer.max_epochs", "1",
            "--data.num_workers", "2", "--data.max_patches_train", "8192"]


def write_cohort(folder: Path, n_slides: int, seed: int = 0) -> tuple[Path, Path]:
    """Random bags with a few shifted "tumor" patches on tumor slides; coords on a grid; 80/20 train/val."""
    from features.store import write_features

    rng = np.random.default_rng(seed)
    features_dir = folder / "store" / "features" / "bench"
    side = int(np.ceil(np.sqrt(PATCHES)))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:PATCHES] * 224
    geometry = {"patch_size": 224, "patch_size_level0": 448, "target_mpp": 0.5, "mpp_level0": 0.25}
    rows = ["slide_id,label,split"]
    for index in range(n_slides):
        slide_id, label = f"s{index:04d}", index % 2
        path = features_dir / f"{slide_id}.h5"
        if not path.is_file():
            values = rng.normal(size=(PATCHES, DIM)).astype(np.float16)
            values[: PATCHES // 50, :8] += 1.5 * label
            write_features(path, coords, geometry, values, {"encoder": "bench"})
        rows.append(f"{slide_id},{label},{'val' if index % 5 == 4 else 'train'}")
    labels = folder / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return features_dir, labels


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def read_bags(features: Path, labels: Path) -> None:
    import pandas as pd

    from features.store import read_bag

    frame = pd.read_csv(labels)
    for slide_id in frame.loc[frame["split"] == "train", "slide_id"]:
        read_bag(features / f"{slide_id}.h5")


def train_epoch(features: Path, labels: Path) -> None:
    """One epoch of the demo ABMIL + ranking loss over the training bags, as ``mil fit`` trains it."""
    import torch
    from lightning.pytorch import Trainer

    from mil.aggregators import ABMIL
    from mil.data import MILDataModule
    from mil.losses import BagLoss
    from mil.training.module import MILModule

    torch.manual_seed(0)
    data = MILDataModule(str(features), str(labels), batch_size=2, pair_batches=True, max_patches_train=8192,
                         num_workers=2)
    loss = BagLoss(pos_weight=None, bag_weight=0.5, max_instance_weight=0.5, ranking_weight=0.1)
    model = MILModule(ABMIL(DIM, 2, hidden_dim=32, attention_dim=16), loss=loss, lr=2e-3)
    Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, accelerator="auto", devices=1).fit(model, datamodule=data)


def round_seconds(folder: Path, n_slides: int) -> dict:
    from mil.mining.cli import main as mine
    from mil.training.cli import best_checkpoint, fit, predict

    features, labels = write_cohort(folder, n_slides)
    run, scores = folder / "mil", folder / "mil_train"
    data = ["--data.features", str(features), "--data.labels", str(labels)]
    fit([*MIL_ARGS, *data, "--trainer.default_root_dir", str(run)])  # the checkpoint the next stages use
    seconds = {
        "read_bags": timed(read_bags, features, labels),
        "mil_epoch": timed(train_epoch, features, labels),
        "score": timed(lambda: predict(["--config", str(run / "config.yaml"), "--data.predict_split", "train",
                                        "--ckpt_path", best_checkpoint(run), "--trainer.default_root_dir", str(scores)])),
        "mine": timed(mine, ["--scores", str(scores), "--labels", str(labels), "--coords", str(features),
                             "--features", str(features), "--out", str(folder / "selection.csv")]),
    }
    n_train = sum(1 for i in range(n_slides) if i % 5 != 4)
    return {"slides": n_slides, "train_patches": n_train * PATCHES, **{k: round(v, 2) for k, v in seconds.items()}}


def extrapolate(rows: list[dict]) -> dict:
    """Least-squares ``a + b x patches`` per stage, evaluated at a Camelyon16-sized training set."""
    patches = np.array([r["train_patches"] for r in rows], dtype=float)
    target = 0.8 * C16_SLIDES * C16_PATCHES_PER_SLIDE
    predicted = {"slides": f"Camelyon16 (fit, {C16_SLIDES} x {C16_PATCHES_PER_SLIDE})", "train_patches": int(target)}
    for stage in ("read_bags", "mil_epoch", "score", "mine"):
        slope, intercept = np.polyfit(patches, [r[stage] for r in rows], 1)
        predicted[stage] = round(float(intercept + slope * target), 1)
    return predicted


def run(out_dir: str | Path = "bench_out/scale") -> list[dict]:
    import os

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    out_dir = Path(out_dir)
    round_seconds(out_dir / "warm_up", 10)  # imports and first-call costs, not part of any size
    rows = [round_seconds(out_dir / f"cohort_{n}", n) for n in SIZES]
    return rows + [extrapolate(rows)]


if __name__ == "__main__":
    import pandas as pd

    print(pd.DataFrame(run(sys.argv[1] if len(sys.argv) > 1 else "bench_out/scale")).to_markdown(index=False))
