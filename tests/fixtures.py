"""Tiny real inputs for every test: pyramidal TIFF slides that OpenSlide reads, and HDF5 feature bags.

One place makes them, so every package's tests exercise the same real formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from features.store import write_features

REAL_SLIDES = Path(__file__).parent / "data" / "openslide"


def write_pyramidal_tiff(path: str | Path, image: np.ndarray, mpp: float | None = 0.5, levels: int = 3,
                         tile: int = 128, quality: int = 90) -> Path:
    """Write ``image`` (H, W, 3 uint8) as a tiled, JPEG-compressed, pyramidal TIFF with resolution tags.

    Each level halves the previous one; ``mpp=None`` writes no resolution tags (a slide without mpp).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    resolution = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        level = image
        for index in range(levels):
            if index:
                h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
                level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
                if index and mpp is not None:
                    scale = 2**index
                    resolution = {"resolution": (1e4 / (mpp * scale),) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                      photometric="rgb", subfiletype=1 if index else 0, **resolution)
            if min(level.shape[:2]) < 2 * tile:
                break
    return path


def tissue_image(width: int, height: int, boxes: list[tuple[int, int, int, int]], seed: int = 0) -> np.ndarray:
    """White background with pink, textured tissue inside each (x0, y0, x1, y1) box."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 242, dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        h, w = y1 - y0, x1 - x0
        base = np.array([214, 140, 180], dtype=np.float32)
        noise = rng.normal(0, 18, size=(h, w, 1)).astype(np.float32)
        image[y0:y1, x0:x1] = np.clip(base + noise * np.array([0.6, 1.0, 0.7]), 0, 255).astype(np.uint8)
    return image


def write_tiny_slide(path: str | Path, width: int = 1024, height: int = 768, mpp: float | None = 0.5,
                     boxes: list[tuple[int, int, int, int]] | None = None, seed: int = 0) -> Path:
    """A small slide with one tissue block (or the given boxes) on white; blank when ``boxes == []``."""
    if boxes is None:
        boxes = [(width // 4, height // 4, 3 * width // 4, 3 * height // 4)]
    return write_pyramidal_tiff(path, tissue_image(width, height, boxes, seed), mpp=mpp)


def write_bag(path: str | Path, features: np.ndarray, coords: np.ndarray | None = None, patch_size_level0: int = 224,
              encoder: str = "synthetic", views: np.ndarray | None = None) -> Path:
    """A features file in our store layout with plausible geometry attributes."""
    n = len(features)
    if coords is None:
        side = max(1, int(np.ceil(np.sqrt(n))))
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1) * patch_size_level0
    geometry = {
        "patch_size": patch_size_level0, "patch_size_level0": patch_size_level0, "patch_level": 0,
        "downsample": 1.0, "target_mpp": 0.5, "mpp_level0": 0.5, "mpp_source": "metadata",
        "level0_width": int(coords[:, 0].max(initial=0) + patch_size_level0),
        "level0_height": int(coords[:, 1].max(initial=0) + patch_size_level0), "overlap": 0,
    }
    attrs = {"encoder": encoder, "weights": "", "weights_sha256": "", "transform": "{}", "hnm_mil_version": "test"}
    return write_features(path, coords, geometry, features.astype(np.float32), attrs, views=views)


def synthetic_bags(out: str | Path, n_slides: int = 12, n_patches: int = 40, dim: int = 16, tumor_fraction: float = 0.1,
                   seed: int = 0) -> tuple[Path, Path]:
    """A folder of bags with a planted tumor direction, and a labels CSV with a train/val/test split.

    Tumor slides hold a few patches shifted along one feature direction; the rest are noise. Returns
    (features folder, labels CSV).
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    folder = out / "features" / "synthetic"
    rows = ["slide_id,label,case_id,split"]
    splits = ["train"] * (n_slides // 2) + ["val"] * (n_slides // 4) + ["test"] * (n_slides - n_slides // 2 - n_slides // 4)
    direction = np.zeros(dim, dtype=np.float32)
    direction[0] = 3.0
    for index in range(n_slides):
        label = index % 2
        features = rng.normal(size=(n_patches, dim)).astype(np.float32)
        if label:
            k = max(1, int(tumor_fraction * n_patches))
            features[:k] += direction
        slide_id = f"slide_{index:03d}"
        write_bag(folder / f"{slide_id}.h5", features)
        rows.append(f"{slide_id},{'tumor' if label else 'normal'},case_{index:03d},{splits[index]}")
    labels = out / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return folder, labels


def dead_pid() -> int:
    """The id of a process that has exited: owner of a temporary left by a killed run."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def no_network(monkeypatch, cache: str | Path, offline: bool) -> None:
    """An empty (or given) hub cache and no network: the hub's endpoint is a closed local port."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def hub_cache_file(cache: str | Path, repo: str, filename: str, revision: str = "0" * 40) -> Path:
    """Where ``filename`` of hub ``repo`` lies in a hub cache at ``cache`` (as `hf download` leaves it); the
    caller writes the file there."""
    folder = Path(cache) / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    path = folder / "snapshots" / revision / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
