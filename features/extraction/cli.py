"""``features tile`` and ``features extract``: options, sharding, the closing summary line."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from features.extraction.distributed import Shard, default_threads, launch, manifest_for, merge_manifests
from features.extraction.extract import ExtractOptions, SlideExtractor, Summary, TileOptions
from features.extraction.extract import tile as tile_slides
from features.options import parse
from features.provenance import prepare_extraction, prepare_tiling
from features.slides import list_slides
from features.store import remove_stale_temporaries

log = logging.getLogger(__name__)


def tile(argv: list[str]) -> None:
    """Find tissue and write patch coordinates (``<out>/coords/<slide_id>.h5``) plus inspection PNGs."""
    run_tile(parse(TileOptions, argv, "features tile", tile.__doc__ or ""))


def run_tile(opts: TileOptions) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prepare_tiling(opts)
    remove_stale_temporaries(Path(opts.out))
    start = time.perf_counter()
    counts = tile_slides(opts)
    print(f"tiled {counts['tiled']} slides in {time.perf_counter() - start:.1f} s; {counts['skipped']} already tiled, "
          f"{counts['error']} errors -> {Path(opts.out) / 'coords'}")


def extract(argv: list[str]) -> None:
    """Tile slides (or reuse coordinates) and embed every patch: ``<out>/features/<tag>/<slide_id>.h5``."""
    run_extract(parse(ExtractOptions, argv, "features extract", extract.__doc__ or ""))


def run_extract(opts: ExtractOptions) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    refs = list_slides(opts.slides)
    result = launch(lambda shard: extract_shard(opts, refs, shard), opts.accelerator, opts.devices, opts.num_nodes)
    if result is not None:
        print(result)


def extract_shard(opts: ExtractOptions, refs: list, shard: Shard) -> str | None:
    """One process's share of the slides; rank 0 cleans up first, merges manifests last, returns the summary."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads or default_threads(shard))
    try:  # the thread count is process-wide: give it back so callers (the HNM loop, heads) are not slowed down
        return _extract_shard(opts, refs, shard)
    finally:
        torch.set_num_threads(previous_threads)


def _extract_shard(opts: ExtractOptions, refs: list, shard: Shard) -> str | None:
    torch.manual_seed(opts.encoder.seed)
    manifest = manifest_for(opts.out, shard)
    extractor = SlideExtractor(opts, shard.device, manifest, rank=shard.rank)
    # Every rank compares (so all stop together on a mismatch); rank 0 alone records, before any slide is touched.
    prepare_extraction(opts, extractor.encoder, write=shard.rank == 0)
    if shard.rank == 0:
        remove_stale_temporaries(Path(opts.out))
    shard.barrier()
    summary = extractor.run(shard.take(refs))
    if shard.world_size > 1:
        summary = gather_summaries(summary, shard)
        shard.barrier()
    if shard.rank != 0:
        return None
    if shard.world_size > 1:
        merge_manifests(opts.out)
    return summary.line(opts.out, extractor.tag)


def gather_summaries(summary: Summary, shard: Shard) -> Summary:
    """Add up every process's counts (the closing line speaks for the whole run)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return summary
    gathered: list[Summary | None] = [None] * shard.world_size
    dist.all_gather_object(gathered, summary)
    total = Summary()
    for part in gathered:
        if part is not None:
            total = total.add(part)
    total.seconds = max(part.seconds for part in gathered if part is not None)
    return total

