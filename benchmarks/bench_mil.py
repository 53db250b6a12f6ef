"""Slide-level training throughput (bags/s) and peak memory when bags stream from disk.

Two cohorts of synthetic bags (50 and 200 slides, same bag size) are trained for one epoch of ABMIL with
Lightning; each run is a fresh process so its peak RSS is its own. Streaming means the peak must not grow with
the number of slides. ``python benchmarks/bench_mil.py [OUT]`` prints a markdown table; ``run(out_dir)``
returns the rows for ``make bench``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (50, 200)
PATCHES, DIM = 1000, 256


def write_cohort(folder: Path, n_slides: int, seed: int = 0) -> tuple[Path, Path]:
    """Bags of ``PATCHES`` x ``DIM`` float16 features (what an extraction writes), 80/20 train/val."""
    from features.store import write_features

    rng = np.random.default_rng(seed)
    features_dir = folder / "features" / "bench"
    rows = ["slide_id,label,split"]
    coords = np.stack(np.meshgrid(np.arange(40), np.arange(25)), -1).reshape(-1, 2)[:PATCHES] * 224
    for index in range(n_slides):
        slide_id, label = f"s{index:04d}", index % 2
        path = features_dir / f"{slide_id}.h5"
        if not path.is_file():
            values = rng.normal(size=(PATCHES, DIM)).astype(np.float16)
            values[: PATCHES // 20, 0] += 2.0 * label
            write_features(path, coords, {"patch_size": 224}, values, {"encoder": "bench"})
        rows.append(f"{slide_id},{label},{'val' if index % 5 == 4 else 'train'}")
    labels = folder / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return features_dir, labels


def train_once(features: str, labels: str) -> dict:
    """One epoch of ABMIL over the training slides; returns bags/s and this process's peak RSS."""
    import torch
    from lightning.pytorch import Trainer

    from mil.aggregators import ABMIL
    from mil.data import MILDataModule
    from mil.training.module import MILModule

    torch.manual_seed(0)
    data = MILDataModule(features, labels, batch_size=1, num_workers=2)
    model = MILModule(ABMIL(data.feature_dim, data.num_classes))
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, accelerator="auto", devices=1)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    n_train = len(data.items("train"))
    return {"train_slides": n_train, "seconds": round(seconds, 2), "bags_per_s": round(n_train / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def run(out_dir: str | Path = "bench_out/mil") -> list[dict]:
    out_dir = Path(out_dir)
    rows = []
    for n_slides in SIZES:
        features, labels = write_cohort(out_dir / f"cohort_{n_slides}", n_slides)
        done = subprocess.run([sys.executable, __file__, "--train", str(features), str(labels)], check=True,
                              capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"slides": n_slides, "patches_per_bag": PATCHES, "dim": DIM, **result})
    print(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    header = ("| slides | patches/bag | dim | train slides | s/epoch | bags/s | peak RSS main (MB) "
              "| peak RSS worker (MB) | device |")
    lines = [header, "|" + "---|" * 9]
    lines += [f"| {r['slides']} | {r['patches_per_bag']} | {r['dim']} | {r['train_slides']} | {r['seconds']} | "
              f"{r['bags_per_s']} | {r['peak_rss_mb']} | {r['worker_peak_rss_mb']} | {r['device']} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--train":
        print(json.dumps(train_once(sys.argv[2], sys.argv[3])))
    else:
        run(sys.argv[1] if len(sys.argv) > 1 else "bench_out/mil")
