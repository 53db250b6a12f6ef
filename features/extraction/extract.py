"""The per-slide work of ``features tile`` and ``features extract``.

Slides are tiled (or their stored coordinates reused), then their patches stream through one DataLoader: worker
processes decode pixels while the main process runs the encoder, and batches never span two slides, so a
slide's numbers do not depend on its neighbours, on the worker count or on how slides are sharded. A slide's
file is written (temporary name, then rename) as soon as its last batch is embedded; a rerun skips files that
exist. Slides are grouped into chunks of at most ``chunk_patches`` patches so a cohort of any size needs
bounded memory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import openslide
import pandas as pd
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from features.encoders import Encoder, EncoderConfig, build_encoder
from features.errors import InputError
from features.extraction.views import ViewPlan, tta_d4
from features.machine import default_workers
from features.patches import PatchDataset, items_for_slide
from features.provenance import lock_path
from features.slides import SlideRef, list_slides, open_slide, slide_mpp
from features.store import (Manifest, coords_path, count_patches, features_path, read_coords,
                            safe_slide_id, write_coords, write_features)
from features.tiling import Geometry, TilingConfig, plan_geometry, tile_slide
from features.tissue import TissueConfig, save_tissue_pngs

log = logging.getLogger(__name__)


@dataclass
class TileOptions:
    """Which slides, where outputs go, and how patches are placed.

    Attributes:
        slides: a slide folder or a ``slide_id,path[,mpp]`` CSV.
        out: output folder (``coords/``, ``features/<tag>/``, ``thumbnails/``, ``manifest.csv``).
        mpp: target resolution in microns per pixel (0.5 ~ 20x, 0.25 ~ 40x).
        patch_size: patch side in pixels at the target resolution.
        overlap: pixels (at the target resolution) shared by neighbouring patches.
        min_tissue: minimum tissue fraction of a patch.
        tissue: tissue-detection settings.
        coords: use existing coordinates instead of tiling: a folder of ``<slide_id>.h5`` coords/features
            files, or a CSV ``slide_id,x,y`` of level-0 top-left corners.
        skip_errors: record bad slides in the manifest and go on instead of stopping.
        overwrite: redo slides whose outputs exist.
        thumbnails: write thumbnail and tissue-mask PNGs when tiling.
    """

    slides: str
    out: str
    mpp: float = 0.5
    patch_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.25
    tissue: TissueConfig = field(default_factory=TissueConfig)
    coords: str | None = None
    skip_errors: bool = False
    overwrite: bool = False
    thumbnails: bool = True


@dataclass
class ExtractOptions(TileOptions):
    """Tiling options plus the encoder and how to run it.

    Attributes:
        encoder: which encoder (timm name, weights file, tag, seed).
        batch_size: patches per forward pass.
        num_workers: DataLoader processes decoding patches while the model runs (0 = in the main process);
            default: the cores this process may use, at most 8.
        threads: torch threads of each process running the model; None = cores / processes.
        tta: ``d4`` stores the mean embedding over the 8 rotations/flips of each patch.
        views: number of seeded augmented views stored as ``features_views`` (V, N, D); 0 = none.
        dtype: storage precision of the embeddings.
        accelerator: ``cpu``, ``gpu``/``cuda``, ``mps`` or ``auto`` (Lightning Fabric's names).
        devices: devices (processes) per node; slides are sharded across them.
        num_nodes: machines; slides are sharded across all processes of all nodes.
        precision: ``bf16``/``fp16`` autocast on GPU; CPU always runs float32.
        channels_last: NHWC memory layout (faster convolutions on GPU); None = on for GPU.
        chunk_patches: patches held in one streaming DataLoader (bounds memory on large cohorts).
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    batch_size: int = 64
    num_workers: int = field(default_factory=default_workers)
    threads: int | None = None
    tta: Literal["none", "d4"] = "none"
    views: int = 0
    dtype: Literal["float16", "float32"] = "float32"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: Literal["32", "bf16", "fp16"] = "32"
    channels_last: bool | None = None
    chunk_patches: int = 200_000


def tiling_config(opts: TileOptions) -> TilingConfig:
    return TilingConfig(target_mpp=opts.mpp, patch_size=opts.patch_size, overlap=opts.overlap,
                        min_tissue=opts.min_tissue)


# ----------------------------------------------------------------------------------------------- coordinates


class CoordSource:
    """Where a slide's patch coordinates come from: given ones (``--coords``), stored ones, or fresh tiling."""

    def __init__(self, opts: TileOptions):
        self.opts = opts
        self.table: dict[str, np.ndarray] | None = None
        if opts.coords and Path(opts.coords).suffix.lower() == ".csv":
            self.table = read_coords_csv(opts.coords)
        elif opts.coords and not Path(opts.coords).is_dir():
            raise InputError(f"{opts.coords}: --coords must be a folder of <slide_id>.h5 files or a slide_id,x,y CSV")

    def get(self, ref: SlideRef) -> tuple[np.ndarray, Geometry]:
        if self.table is not None:
            return self._from_table(ref)
        if self.opts.coords:
            given = Path(self.opts.coords) / f"{ref.slide_id}.h5"
            if not given.is_file():
                raise InputError(f"{given}: no coordinates for slide {ref.slide_id!r} in --coords; tile it first")
            coords, attrs = read_coords(given)
            return coords, Geometry.from_attrs(attrs)
        stored = coords_path(self.opts.out, ref.slide_id)
        if stored.is_file() and not self.opts.overwrite:
            coords, attrs = read_coords(stored)
            geometry = Geometry.from_attrs(attrs)
            check_geometry(geometry, self.opts, stored)
            return coords, geometry
        return tile_and_store(ref, self.opts)

    def _from_table(self, ref: SlideRef) -> tuple[np.ndarray, Geometry]:
        slide = open_slide(ref.path)
        try:
            mpp, source = slide_mpp(slide, ref)
            geometry = plan_geometry(slide, mpp, source, tiling_config(self.opts))
        finally:
            slide.close()
        assert self.table is not None
        return self.table.get(ref.slide_id, np.zeros((0, 2), dtype=np.int64)), geometry


def read_coords_csv(path: str | Path) -> dict[str, np.ndarray]:
    """``slide_id,x,y`` rows (level-0 top-left corners, as in a selection file) grouped by slide."""
    table = pd.read_csv(path, dtype={"slide_id": str})
    missing = {"slide_id", "x", "y"} - set(table.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {sorted(missing)}; a coordinates CSV needs slide_id,x,y")
    return {safe_slide_id(sid, str(path)): group[["x", "y"]].to_numpy(np.int64)
            for sid, group in table.groupby("slide_id", sort=True)}


def check_geometry(geometry: Geometry, opts: TileOptions, path: Path) -> None:
    """Stored coordinates are reused only if they were made with the requested patch size and resolution."""
    wanted = (opts.patch_size, opts.mpp, opts.overlap)
    have = (geometry.patch_size, geometry.target_mpp, geometry.overlap)
    if not np.allclose(wanted, have):
        raise InputError(f"{path}: tiled with patch_size/mpp/overlap {have}, not {wanted}; pass --overwrite to "
                         "re-tile, or another --out")


def tile_and_store(ref: SlideRef, opts: TileOptions) -> tuple[np.ndarray, Geometry]:
    """Tile one slide, write its coords file (and inspection PNGs)."""
    slide = open_slide(ref.path)
    try:
        coords, geometry, mask = tile_slide(slide, ref, opts.tissue, tiling_config(opts))
        if opts.thumbnails:
            save_tissue_pngs(slide, mask, Path(opts.out) / "thumbnails", ref.slide_id, coords,
                             geometry.patch_size_level0)
    except openslide.OpenSlideError as error:
        raise InputError(f"{ref.path}: reading pixels failed while tiling ({error}); the file is damaged: re-export "
                         "it or pass --skip_errors") from None
    finally:
        slide.close()
    write_coords(coords_path(opts.out, ref.slide_id), coords, geometry.to_attrs())
    return coords, geometry


def tile(opts: TileOptions, refs: Sequence[SlideRef] | None = None, manifest: Manifest | None = None) -> dict[str, int]:
    """``features tile``: coordinates (and PNGs) for every slide; returns counts by status."""
    refs = list_slides(opts.slides) if refs is None else refs
    manifest = manifest or Manifest(Path(opts.out) / "manifest.csv")
    source = CoordSource(opts)
    counts = {"tiled": 0, "skipped": 0, "error": 0}
    for ref in tqdm(refs, desc="tiling", unit="slide"):
        if coords_path(opts.out, ref.slide_id).is_file() and not opts.overwrite:
            counts["skipped"] += 1
            continue
        start = time.perf_counter()
        try:
            coords, _ = source.get(ref)
        except InputError as error:
            manifest.record(ref.slide_id, "error", error=str(error))
            if not opts.skip_errors:
                raise
            counts["error"] += 1
            continue
        manifest.record(ref.slide_id, "tiled", len(coords), time.perf_counter() - start)
        counts["tiled"] += 1
    return counts


# ------------------------------------------------------------------------------------------------ embedding


@dataclass
class SlideJob:
    """One slide being embedded: its patches, where they sit in the streaming dataset, and results so far."""

    ref: SlideRef
    coords: np.ndarray
    geometry: Geometry
    offset: int = 0
    started: float = field(default_factory=time.perf_counter)
    tiling: float = 0.0  # seconds spent finding its patches; the slide's own time restarts when embedding starts
    features: np.ndarray | None = None
    views: np.ndarray | None = None
    plan: ViewPlan | None = None
    done: int = 0
    error: str = ""

    @property
    def n(self) -> int:
        return len(self.coords)


class GuardedPatches(Dataset):
    """A :class:`PatchDataset` whose read failures come back as data, so one damaged slide fails alone."""

    def __init__(self, patches: PatchDataset, blank: torch.Tensor):
        self.patches = patches
        self.blank = blank

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image, index = self.patches[index]
            return image, index, ""
        except Exception as error:  # noqa: BLE001 - reported per slide in the main process
            message = str(error) if isinstance(error, InputError) else (
                f"{self.patches.items[index].slide_path}: {type(error).__name__}: {error}")
            return self.blank, index, message.splitlines()[0] if message else type(error).__name__


def slide_batches(jobs: Sequence[SlideJob], batch_size: int) -> list[list[int]]:
    """Batches of dataset indices that never span two slides (so results do not depend on neighbours)."""
    batches = []
    for job in jobs:
        for start in range(0, job.n, batch_size):
            batches.append(list(range(job.offset + start, job.offset + min(job.n, start + batch_size))))
    return batches


class Embedder:
    """The encoder on its device, with autocast, channels-last, D4 test-time augmentation and views."""

    def __init__(self, encoder: Encoder, opts: ExtractOptions, device: torch.device):
        self.encoder = encoder
        self.opts = opts
        self.device = device
        gpu = device.type == "cuda"
        self.channels_last = gpu if opts.channels_last is None else opts.channels_last
        self.model = encoder.model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        self.autocast_dtype = dtypes.get(opts.precision) if gpu else None
        if opts.precision != "32" and not gpu:
            log.warning("--precision %s applies to GPU only; CPU runs float32", opts.precision)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        context = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                   else contextlib.nullcontext())
        with context:
            return self.model(batch).float()

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return tta_d4(self._forward, batch) if self.opts.tta == "d4" else self._forward(batch)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, job: SlideJob, rows: np.ndarray) -> None:
        batch = images.to(self.device, non_blocking=True)
        assert job.features is not None
        job.features[rows] = self.embed(batch).cpu().numpy()
        if job.plan is not None and job.views is not None:
            spec = self.encoder.transform_spec
            for view in range(self.opts.views):
                augmented = job.plan.apply(view, rows, batch, spec["mean"], spec["std"])
                job.views[view, rows] = self.embed(augmented).cpu().numpy()


@dataclass
class Summary:
    """What one process did, for the closing line."""

    done: int = 0
    empty: int = 0
    skipped: int = 0
    errors: int = 0
    patches: int = 0
    seconds: float = 0.0

    def add(self, other: Summary) -> Summary:
        return Summary(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[Any, ...]:
        return (self.done, self.empty, self.skipped, self.errors, self.patches, self.seconds)

    def line(self, out: str | Path, tag: str) -> str:
        rate = self.patches / self.seconds if self.seconds else 0.0
        return (f"extracted {self.done} slides ({self.patches} patches, {rate:.0f} patches/s) in {self.seconds:.1f} s; "
                f"{self.empty} without tissue, {self.skipped} already done, {self.errors} errors -> "
                f"{Path(out) / 'features' / tag} (see {Path(out) / 'manifest.csv'})")


class SlideExtractor:
    """Embeds a list of slides with one encoder on one device; records every slide in a manifest."""

    def __init__(self, opts: ExtractOptions, device: torch.device, manifest: Manifest, rank: int = 0):
        self.opts = opts
        self.device = device
        self.manifest = manifest
        self.rank = rank
        self.encoder = build_encoder(opts.encoder, patch_size=opts.patch_size)
        self.embedder = Embedder(self.encoder, opts, device)
        self.coord_source = CoordSource(opts)
        self.summary = Summary()
        self.dtype = np.dtype(opts.dtype)
        self.locks: dict[str, FileLock] = {}

    @property
    def tag(self) -> str:
        return self.encoder.tag

    def output(self, ref: SlideRef) -> Path:
        return features_path(self.opts.out, self.tag, ref.slide_id)

    def run(self, refs: Sequence[SlideRef]) -> Summary:
        start = time.perf_counter()
        todo = [ref for ref in refs if self.opts.overwrite or not self.output(ref).is_file()]
        for ref in refs:
            if ref not in todo:
                self._record_existing(ref)
        busy: list[SlideRef] = []
        try:
            with tqdm(total=len(todo), desc=f"slides[{self.rank}]" if self.rank else "slides", unit="slide",
                      position=0) as bar:
                for jobs in self._chunks(todo, bar, busy):
                    self._embed_chunk(jobs, bar)
                # Slides another live run held: wait for it, then keep its file or do what it left undone.
                for jobs in self._chunks(busy, bar, None):
                    self._embed_chunk(jobs, bar)
        finally:
            for lock in self.locks.values():
                lock.release(force=True)
            self.locks.clear()
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    def _claim(self, ref: SlideRef, busy: list[SlideRef] | None) -> bool:
        """Lock a slide for this run; False if another live run holds it (noted in ``busy``) or just finished it.

        The lock is an OS file lock, so a killed holder never blocks a later run. ``busy is None`` waits for it.
        """
        lock = FileLock(str(lock_path(self.opts.out, self.tag, ref.slide_id)))
        try:
            lock.acquire(timeout=-1 if busy is None else 0)
        except Timeout:
            assert busy is not None
            busy.append(ref)
            return False
        if self.output(ref).is_file() and (busy is None or not self.opts.overwrite):
            lock.release()  # finished by another run since this one listed its work
            self._record_existing(ref)
            return False
        self.locks[ref.slide_id] = lock
        return True

    def _release(self, ref: SlideRef) -> None:
        lock = self.locks.pop(ref.slide_id, None)
        if lock is not None:
            lock.release(force=True)

    def _record_existing(self, ref: SlideRef) -> None:
        self.summary.skipped += 1
        if self.manifest.rows.get(ref.slide_id, {}).get("status") not in {"ok", "empty"}:
            n = count_patches(self.output(ref))
            self.manifest.record(ref.slide_id, "ok" if n else "empty", n)

    def _chunks(self, refs: Sequence[SlideRef], bar: tqdm, busy: list[SlideRef] | None) -> Iterator[list[SlideJob]]:
        """Tile (or load coordinates of) slides until a chunk is full; empty and failing slides finish here."""
        jobs: list[SlideJob] = []
        total = 0
        for ref in refs:
            if not self._claim(ref, busy):
                if busy is None or ref not in busy:
                    bar.update()
                continue
            started = time.perf_counter()
            try:
                coords, geometry = self.coord_source.get(ref)
            except InputError as error:
                self._fail(ref, str(error), started)
                bar.update()
                continue
            job = SlideJob(ref, coords, geometry, offset=total, started=started, tiling=time.perf_counter() - started)
            if job.n == 0:
                self._finish(job)
                bar.update()
                continue
            jobs.append(job)
            total += job.n
            if total >= self.opts.chunk_patches:
                yield jobs
                jobs, total = [], 0
        if jobs:
            yield jobs

    def _embed_chunk(self, jobs: list[SlideJob], bar: tqdm) -> None:
        items = [item for job in jobs for item in items_for_slide(job.ref.path, job.coords, job.geometry)]
        size = self.encoder.transform_spec["input_size"]
        dataset = GuardedPatches(PatchDataset(items, self.encoder.transform), torch.zeros(size))
        workers = self.opts.num_workers
        loader = DataLoader(dataset, batch_sampler=slide_batches(jobs, self.opts.batch_size), num_workers=workers,
                            pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None)
        owner = np.repeat(np.arange(len(jobs)), [job.n for job in jobs])
        patches_bar: tqdm | None = None
        for images, index, errors in loader:
            job = jobs[owner[int(index[0])]]
            if job.done == 0:
                self._start(job)
                patches_bar = tqdm(total=job.n, desc=job.ref.slide_id, unit="patch", leave=False, position=1)
            rows = index.numpy() - job.offset
            failure = next((e for e in errors if e), "")
            if failure and not job.error:
                job.error = failure
            if not job.error:
                self.embedder(images, job, rows)
            job.done += len(rows)
            if patches_bar is not None:
                patches_bar.update(len(rows))
            if job.done == job.n:
                if patches_bar is not None:
                    patches_bar.close()
                self._fail(job.ref, job.error, job.started) if job.error else self._finish(job)
                bar.update()

    def _start(self, job: SlideJob) -> None:
        job.started = time.perf_counter() - job.tiling  # per slide, not since its chunk was tiled (manifest.csv)
        job.features = np.zeros((job.n, self.encoder.dim), dtype=np.float32)
        if self.opts.views:
            job.views = np.zeros((self.opts.views, job.n, self.encoder.dim), dtype=np.float32)
            job.plan = ViewPlan(self.opts.views, job.n, self.opts.encoder.seed, job.ref.slide_id)

    def feature_attrs(self) -> dict[str, Any]:
        return {**self.encoder.attrs(), "tta": self.opts.tta, "n_views": self.opts.views,
                "view_seed": self.opts.encoder.seed if self.opts.views else ""}

    def _finish(self, job: SlideJob) -> None:
        if job.n == 0:
            log.warning("%s: no tissue patches; writing an empty features file", job.ref.slide_id)
            features = np.zeros((0, self.encoder.dim), dtype=self.dtype)
            views = np.zeros((self.opts.views, 0, self.encoder.dim), dtype=self.dtype) if self.opts.views else None
        else:
            assert job.features is not None
            features = job.features.astype(self.dtype)
            views = None if job.views is None else job.views.astype(self.dtype)
        write_features(self.output(job.ref), job.coords, job.geometry.to_attrs(), features, self.feature_attrs(),
                       views=views)
        seconds = time.perf_counter() - job.started
        self.manifest.record(job.ref.slide_id, "ok" if job.n else "empty", job.n, seconds)
        self._release(job.ref)
        self.summary.done += bool(job.n)
        self.summary.empty += not job.n
        self.summary.patches += job.n
        job.features = job.views = None  # free memory as soon as the file is written

    def _fail(self, ref: SlideRef, message: str, started: float) -> None:
        self.manifest.record(ref.slide_id, "error", seconds=time.perf_counter() - started, error=message)
        self._release(ref)
        self.summary.errors += 1
        if not self.opts.skip_errors:
            raise InputError(message)
        log.warning("skipping %s: %s", ref.slide_id, message)
