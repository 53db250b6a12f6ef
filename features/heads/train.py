"""Train a head on stored embeddings in seconds, score embeddings with it, and save or load it.

Training is a real Lightning run on CPU with everything that costs time and says nothing switched off
(no checkpoints, no logger, no progress bar): the data are already in memory.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from torch.utils.data import DataLoader

from features.errors import InputError
from features.heads.data import EmbeddingSet, ViewSamplingDataset, as_batch
from features.heads.model import HeadModule
from features.store import atomic_path


@dataclass
class HeadConfig:
    """How to train one head; the defaults suit a few hundred to a few hundred thousand patches."""

    hidden: int = 0
    """0: linear probe; >0: one hidden layer of this width."""
    dropout: float = 0.0
    """Dropout before the output layer."""
    lr: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    epochs: int = 30
    """Passes over the training patches."""
    min_steps: int = 300
    """Small sets still get enough optimiser steps to converge."""
    batch_size: int = 256
    """Patches per step."""
    view_sampling: bool = True
    """Sample among stored augmented views (feature-space augmentation)."""
    include_clean: bool = True
    """The un-augmented embedding is one of the views sampled."""
    noise_std: float = 0.0
    """Gaussian noise in embedding space, in standard deviations."""
    mixup_alpha: float = 0.0
    """Mixup in embedding space (0 = off)."""
    balance: bool = True
    """Weight classes by inverse frequency."""
    seed: int = 0
    """Seeds initialisation and sampling."""


@dataclass
class TrainedHead:
    module: HeadModule
    config: HeadConfig
    classes: tuple[str, ...]
    seconds: float
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return weights.tolist()


def train_head(train: EmbeddingSet, config: HeadConfig) -> TrainedHead:
    """Fit a head on ``train`` for a fixed number of steps; deterministic for a given seed.

    No validation loop runs during fitting: heads are compared after training (:func:`evaluate`), and a
    per-epoch loop would cost more than the training itself on small sets.
    """
    if len(train) == 0 or len(np.unique(train.labels)) < 2:
        raise InputError("training split needs at least one patch of each of two classes")
    L.seed_everything(config.seed, workers=True, verbose=False)
    n_classes = len(train.classes)
    module = HeadModule(train.dim, n_classes, config.hidden, config.dropout, config.lr, config.weight_decay,
                        config.noise_std, config.mixup_alpha,
                        class_weights(train.labels, n_classes) if config.balance else None)
    module.set_standardisation(torch.from_numpy(train.features.astype(np.float32)))
    dataset = ViewSamplingDataset(train, config.view_sampling, config.include_clean, config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, collate_fn=as_batch,
                        generator=torch.Generator().manual_seed(config.seed))
    steps = max(config.epochs * math.ceil(len(train) / config.batch_size), config.min_steps)
    start = time.perf_counter()
    with _quiet(), _one_thread():
        trainer = L.Trainer(max_epochs=-1, max_steps=steps, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, deterministic=True)
        trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    module.eval()
    return TrainedHead(module, config, train.classes, seconds, int(trainer.global_step))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Heads are tiny matrix products: extra threads only add synchronisation (10-30x slower on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's per-fit banners and hints: a regime search runs dozens of fits."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|log_every_n_steps|LeafSpec|val_dataloader).*")
            yield
    finally:
        rank_zero.setLevel(level)


@torch.no_grad()
def predict_proba(module: HeadModule, features: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Class probabilities (N, C) for raw stored embeddings."""
    module.eval()
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    parts = [torch.softmax(module(x[i:i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, module.hparams.n_classes), dtype=np.float32)


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The positive-score threshold that maximises F1 (chosen on validation, applied to test)."""
    candidates = np.unique(scores)
    if len(candidates) > 256:
        candidates = np.unique(np.quantile(scores, np.linspace(0, 1, 257)))
    f1s = [f1_score(labels, scores >= t, zero_division=0) for t in candidates]
    return float(candidates[int(np.argmax(f1s))]) if len(candidates) else 0.5


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = scores >= threshold
    both = len(np.unique(labels)) == 2
    return {
        "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)) if both else float("nan"),
    }


def multiclass_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predicted = probs.argmax(1)
    return {"accuracy": float((predicted == labels).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0))}


def evaluate(head: TrainedHead, splits: dict[str, EmbeddingSet]) -> dict[str, float]:
    """Metrics per split; for two classes the F1 threshold is chosen on ``val`` (0.5 without one)."""
    probs = {name: predict_proba(head.module, data.features) for name, data in splits.items() if len(data)}
    metrics: dict[str, float] = {}
    if len(head.classes) == 2:
        threshold = best_f1_threshold(probs["val"][:, 1], splits["val"].labels) if "val" in probs else 0.5
        metrics["threshold"] = threshold
        for name, p in probs.items():
            metrics.update({f"{name}_{k}": v for k, v in binary_metrics(p[:, 1], splits[name].labels, threshold).items()})
    else:
        for name, p in probs.items():
            metrics.update({f"{name}_{k}": v for k, v in multiclass_metrics(p, splits[name].labels).items()})
    head.metrics = metrics
    return metrics


def save_head(head: TrainedHead, out_dir: str | Path, extra: dict | None = None) -> Path:
    """``head.safetensors`` (weights and standardisation) and ``head.json`` (everything needed to rebuild it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "head.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in head.module.state_dict().items()}, str(tmp))
    info = {"hparams": dict(head.module.hparams), "config": asdict(head.config), "classes": list(head.classes),
            "seconds": head.seconds, "steps": head.steps, "metrics": head.metrics,
            "versions": {"torch": torch.__version__, "lightning": L.__version__}, **(extra or {})}
    with atomic_path(out_dir / "head.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2, default=str))
    return out_dir / "head.safetensors"


def load_head(out_dir: str | Path) -> tuple[HeadModule, dict]:
    out_dir = Path(out_dir)
    if not (out_dir / "head.json").is_file():
        raise InputError(f"{out_dir}: no head.json; train a head with `features heads --out {out_dir}`")
    info = json.loads((out_dir / "head.json").read_text())
    module = HeadModule(**info["hparams"])
    module.load_state_dict(load_file(str(out_dir / "head.safetensors")))
    return module.eval(), info
