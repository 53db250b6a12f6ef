"""Extraction throughput: is the pipeline as fast as its slowest stage?

On the same slides, in one run, three rates in patches/s:

- ``read``: the DataLoader alone (same dataset, workers and batches as extraction; no model);
- ``encode``: the encoder alone on in-memory tensors of the same shape;
- ``full``: ``features extract``'s loop end to end (reading in workers overlapped with the forward pass).

``efficiency = full / min(read, encode)``: 1.0 means decoding is completely hidden behind the model (or the other
way round). On a machine with few cores both stages compete for the same cores, so the best setting gives the
model the cores and one worker the decoding, and a small encoder whose rate is far from the reader's.

A second table answers "can the loader feed a GPU?" without one: the same pipeline with an encoder that costs
nothing (global average pooling, 3-d output) against the reader alone, at 1 and 2 decode workers. Its
``pipeline_over_read`` is the share of the pure read rate the extraction loop keeps (target >= 0.9), and the rates
at 1 and 2 workers show how decoding scales with workers.

Usage: ``python benchmarks/bench_extract.py --out bench_out [--slides slides.csv]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from features.encoders import Encoder, EncoderConfig, build_encoder
from features.extraction.extract import (CoordSource, ExtractOptions, GuardedPatches, SlideExtractor, SlideJob,
                                         slide_batches, tile)
from features.patches import PatchDataset, items_for_slide
from features.slides import list_slides
from features.store import Manifest

# (num_workers, torch threads of the model process); the first is the demo setting.
SETTINGS = ((2, 2), (0, 2), (1, 1), (1, 2))


def demo_slides(out_dir: Path) -> Path:
    """The demo cohort (24 synthetic slides) unless it is already there."""
    from features.synth import PRESETS, write_cohort

    csv = out_dir / "cohort" / "slides.csv"
    if not csv.is_file():
        write_cohort(out_dir / "cohort", PRESETS["demo"], num_workers=1)
    return csv


def read_rate(jobs: list[SlideJob], dataset: GuardedPatches, batch_size: int, num_workers: int) -> float:
    loader = DataLoader(dataset, batch_sampler=slide_batches(jobs, batch_size), num_workers=num_workers,
                        prefetch_factor=4 if num_workers else None)
    start, n = time.perf_counter(), 0
    for images, _, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - start)


def encode_rate(model: torch.nn.Module, shape: list[int], batch_size: int, n: int) -> float:
    batch = torch.randn(batch_size, *shape)
    with torch.inference_mode():
        model(batch)  # warm-up: first-call allocations are not throughput
        start, done = time.perf_counter(), 0
        while done < n:
            model(batch)
            done += batch_size
    return done / (time.perf_counter() - start)


def run(out_dir: str | Path, slides: str | Path | None = None, encoder: str = "resnet10t", patch_size: int = 128,
        batch_size: int = 64, settings: tuple[tuple[int, int], ...] = SETTINGS, encode_patches: int = 2048,
        ) -> list[dict[str, Any]]:
    """Measure read / encode / full patches-per-second for each (workers, threads) setting."""
    out_dir = Path(out_dir)
    slides = Path(slides) if slides else demo_slides(out_dir)
    base = ExtractOptions(slides=str(slides), out=str(out_dir / "extract"), patch_size=patch_size,
                          batch_size=batch_size, encoder=EncoderConfig(name=encoder), thumbnails=False)
    refs = list_slides(slides)
    tile(base, refs, Manifest(out_dir / "extract" / "tile_manifest.csv"))
    source = CoordSource(base)
    jobs, offset = [], 0
    for ref in refs:
        coords, geometry = source.get(ref)
        jobs.append(SlideJob(ref, coords, geometry, offset=offset))
        offset += len(coords)
    model = build_encoder(base.encoder, patch_size=patch_size)
    items = [item for job in jobs for item in items_for_slide(job.ref.path, job.coords, job.geometry)]
    dataset = GuardedPatches(PatchDataset(items, model.transform), torch.zeros(model.transform_spec["input_size"]))
    rows = []
    for workers, threads in settings:
        torch.set_num_threads(threads)
        read = read_rate(jobs, dataset, batch_size, workers)
        encode = encode_rate(model.model, model.transform_spec["input_size"], batch_size, encode_patches)
        opts = dataclasses.replace(base, num_workers=workers, threads=threads, overwrite=True)
        extractor = SlideExtractor(opts, torch.device("cpu"), Manifest(out_dir / "extract" / "bench_manifest.csv"))
        summary = extractor.run(refs)
        full = summary.patches / summary.seconds
        rows.append({
            "encoder": encoder, "patch_size": patch_size, "batch_size": batch_size, "num_workers": workers,
            "threads": threads, "slides": len(refs), "patches": summary.patches,
            "read_per_s": round(read, 1), "encode_per_s": round(encode, 1), "full_per_s": round(full, 1),
            "efficiency": round(full / min(read, encode), 3), "full_seconds": round(summary.seconds, 1),
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        })
    return rows + loader_rows(out_dir, base, jobs, dataset)


def free_encoder(encoder: Encoder) -> Encoder:
    """The same transform and tag with a model that costs nothing: the mean colour of the patch."""
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    return dataclasses.replace(encoder, model=pool, dim=3)


def loader_rows(out_dir: Path, base: ExtractOptions, jobs: list[SlideJob], dataset: GuardedPatches,
                workers_list: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    """Full extraction with a free encoder vs the reader alone, at each worker count (threads: 1 for the model)."""
    from unittest import mock

    import features.extraction.extract as extract_module

    rows = []
    refs = [job.ref for job in jobs]
    for workers in workers_list:
        torch.set_num_threads(1)
        read = read_rate(jobs, dataset, base.batch_size, workers)
        opts = dataclasses.replace(base, num_workers=workers, threads=1, overwrite=True,
                                   out=str(out_dir / "extract_free"))
        with mock.patch.object(extract_module, "build_encoder", lambda *a, **k: free_encoder(build_encoder(*a, **k))):
            extractor = SlideExtractor(opts, torch.device("cpu"), Manifest(out_dir / "extract_free" / "manifest.csv"))
        summary = extractor.run(refs)
        full = summary.patches / summary.seconds
        rows.append({"encoder": "free (mean colour)", "num_workers": workers, "patches": summary.patches,
                     "read_per_s": round(read, 1), "pipeline_per_s": round(full, 1),
                     "pipeline_over_read": round(full / read, 3)})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = ["encoder", "patch_size", "num_workers", "threads", "patches", "read_per_s", "encode_per_s",
               "full_per_s", "efficiency", "full_seconds"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out", help="working folder (the demo cohort is written here)")
    parser.add_argument("--slides", default=None, help="slide folder or CSV; default: the demo cohort")
    parser.add_argument("--encoder", default="resnet10t")
    parser.add_argument("--patch_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    rows = run(args.out, args.slides, args.encoder, args.patch_size, args.batch_size)
    print(markdown(rows))


if __name__ == "__main__":
    main()
