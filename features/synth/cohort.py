"""The synthetic cohort: which slides exist (labels, cases, sites, splits), and writing them to disk.

:func:`plan_cohort` is pure bookkeeping (no pixels), so splits and folds can be checked on hundreds of slides in
milliseconds; :func:`write_cohort` renders each planned slide, writes its TIFF and ASAP XML atomically, skips
slides that are already complete, and rewrites the CSVs.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from features.errors import InputError
from features.provenance import package_version
from features.store import atomic_path, remove_stale_temporaries
from features.synth.asap import write_asap
from features.synth.render import SlideSpec, render_slide
from features.synth.tiff import write_pyramidal_tiff

SPLITS = ("train", "val", "test")
SITES = ("site_A", "site_B", "site_C", "site_D")
TUMOR_GROUP, LOOKALIKE_GROUP = "Tumor", "Lookalike"
SETTINGS_NAME = "synth_config.json"


@dataclass(frozen=True)
class CohortConfig:
    """Size and make-up of a synthetic cohort; the defaults are the CPU demo."""

    n_slides: int = 24
    width: int = 3000  # level-0 pixels at ``mpp``; slides scanned at mpp / 2 get twice as many
    height: int = 2500
    mpp: float = 0.5
    high_res_fraction: float = 0.125  # share of slides scanned at mpp / 2 ("40x")
    tumor_fraction: float = 0.5  # share of slides labelled tumor
    tumor_area: tuple[float, float] = (0.02, 0.06)  # tumor share of tissue on a tumor slide (min, max)
    lookalike_area: tuple[float, float] = (0.015, 0.04)  # look-alike share of tissue on every slide
    # Look-alike share on tumor slides (None: as on normal ones). Reactive change is commoner beside tumor, so
    # more look-alikes on tumor slides make them a slide-level shortcut that attention MIL can learn.
    tumor_lookalike_area: tuple[float, float] | None = None
    lookalike_mimicry: float = 0.0  # 0..1: how far look-alikes take tumor's colour, size and density
    coverage: tuple[float, float] = (0.3, 0.6)  # tissue share of the slide
    paired_fraction: float = 0.34  # share of slides that come from a case with two slides
    n_sites: int = 3
    site_cast: float = 1.0  # scales each site's colour cast (0: one look everywhere; 3: casts of ~10 % a channel)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test shares of cases
    folds: int = 0  # K >= 3 adds fold_0..fold_{K-1} columns (0: none)
    seed: int = 0
    tile: int = 256
    quality: int = 90

    def check(self) -> CohortConfig:
        if self.n_slides < 2:
            raise InputError(f"--n_slides {self.n_slides}: a cohort needs at least 2 slides")
        if min(self.width, self.height) < 256:
            raise InputError(f"--width/--height {self.width}x{self.height}: use at least 256 px per side")
        if not 0 < self.tumor_fraction < 1:
            raise InputError(f"--tumor_fraction {self.tumor_fraction}: must be between 0 and 1 (exclusive)")
        if self.folds and self.folds < 3:
            raise InputError(f"--folds {self.folds}: use 0 (no folds) or at least 3 (test, val and train folds)")
        for name in ("high_res_fraction", "paired_fraction", "lookalike_mimicry"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"--{name} {getattr(self, name)}: must be between 0 and 1")
        if not 1 <= self.n_sites <= len(SITES):
            raise InputError(f"--n_sites {self.n_sites}: use 1 to {len(SITES)} sites")
        if not 0 <= self.site_cast <= 5:
            raise InputError(f"--site_cast {self.site_cast}: use 0 (no cast) to 5 (casts of ~20 % a channel)")
        if self.mpp <= 0:
            raise InputError(f"--mpp {self.mpp}: microns per pixel must be positive")
        return self


# The demo's look-alikes are rare on normal slides, common on tumor slides and halfway to tumor in colour and size:
# a frozen encoder with attention MIL then learns them as tumor evidence, the error mining exists to fix
# (docs/synthetic_cohort.md). The class defaults keep look-alikes equally common on both classes.
DEMO_LOOKALIKES = dict(lookalike_area=(0.005, 0.015), tumor_lookalike_area=(0.04, 0.08), lookalike_mimicry=0.5)

# The mimic preset's look-alikes take tumor's nuclear colour, size, density and tint (mimicry 1: only outline and
# chromatin differ) and are commoner still on tumor slides (8-14% of the tissue, about three times the tumor):
# a confident slide model then scores most of a tumor slide's look-alikes above the pseudo-label threshold, the
# failure the positive selection must survive (docs/method.md, "Pseudo-positives when look-alikes mimic tumor").
MIMIC_LOOKALIKES = dict(lookalike_area=(0.005, 0.015), tumor_lookalike_area=(0.08, 0.14), lookalike_mimicry=1.0)

PRESETS: dict[str, CohortConfig] = {
    "demo": CohortConfig(**DEMO_LOOKALIKES),
    "mimic": CohortConfig(**MIMIC_LOOKALIKES),
    "tiny": CohortConfig(n_slides=6, width=1200, height=1000, high_res_fraction=1 / 3),
}


@dataclass
class CohortPaths:
    """Where a cohort lives; ``slides_csv`` paths are relative to its own folder."""

    root: Path
    slides: Path
    slides_csv: Path
    labels_csv: Path
    annotations: Path
    summary: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)


def plan_cohort(config: CohortConfig) -> pd.DataFrame:
    """One row per slide: slide_id, label, case_id, site, split, fold_k..., mpp, width, height, seed."""
    config.check()
    rng = np.random.default_rng([config.seed, 0])
    n_tumor = int(np.clip(round(config.n_slides * config.tumor_fraction), 1, config.n_slides - 1))
    cases = _cases("tumor", n_tumor, config) + _cases("normal", config.n_slides - n_tumor, config)
    cases = [cases[i] for i in rng.permutation(len(cases))]
    for index, case in enumerate(cases):
        case["case_id"] = f"case_{index:03d}"
        case["site"] = SITES[index % min(config.n_sites, len(SITES))]
    _assign_splits(rng, cases, config)
    rows = []
    for case in cases:
        for _ in range(case.pop("n")):
            rows.append(dict(case))
    high_res = set(rng.choice(len(rows), size=int(round(len(rows) * config.high_res_fraction)), replace=False))
    for index, row in enumerate(rows):
        scale = 2 if index in high_res else 1
        row.update(slide_id=f"slide_{index:03d}", mpp=config.mpp / scale, width=config.width * scale,
                   height=config.height * scale, seed=int(rng.integers(2**31)))
    columns = ["slide_id", "label", "case_id", "site", "split"] + [f"fold_{k}" for k in range(config.folds)]
    return pd.DataFrame(rows)[columns + ["mpp", "width", "height", "seed"]]


def _cases(label: str, n_slides: int, config: CohortConfig) -> list[dict]:
    pairs = int(n_slides * config.paired_fraction) // 2
    sizes = [2] * pairs + [1] * (n_slides - 2 * pairs)
    return [{"label": label, "n": n} for n in sizes]


def _assign_splits(rng: np.random.Generator, cases: list[dict], config: CohortConfig) -> None:
    """Case-grouped, label-stratified split (and folds), deterministic for a seed."""
    for label in ("tumor", "normal"):
        members = [case for case in cases if case["label"] == label]
        order = [members[i] for i in rng.permutation(len(members))]
        n = len(order)
        n_val = max(1, round(n * config.split[1])) if n >= 3 else 0
        n_test = max(1, round(n * config.split[2])) if n >= 2 else 0
        for index, case in enumerate(order):
            case["split"] = "test" if index < n_test else "val" if index < n_test + n_val else "train"
        for k in range(config.folds):
            for index, case in enumerate(order):
                group = index % config.folds
                case[f"fold_{k}"] = "test" if group == k else "val" if group == (k + 1) % config.folds else "train"


def slide_spec(row: pd.Series | dict, config: CohortConfig) -> SlideSpec:
    return SlideSpec(
        slide_id=row["slide_id"], tumor=row["label"] == "tumor", width=int(row["width"]), height=int(row["height"]),
        mpp=float(row["mpp"]), seed=int(row["seed"]), site=SITES.index(row["site"]), coverage=config.coverage,
        tumor_area=config.tumor_area, lookalike_area=config.lookalike_area,
        tumor_lookalike_area=config.tumor_lookalike_area,
        lookalike_mimicry=config.lookalike_mimicry, site_cast=config.site_cast,
    )


def write_slide(spec: SlideSpec, slides: Path, annotations: Path, tile: int, quality: int) -> dict:
    """Render one slide and write its TIFF and XML; returns its summary row."""
    start = time.perf_counter()
    image, layout = render_slide(spec)
    write_asap(annotations / f"{spec.slide_id}.xml", {TUMOR_GROUP: layout.tumor, LOOKALIKE_GROUP: layout.lookalike})
    write_pyramidal_tiff(slides / f"{spec.slide_id}.tiff", image, spec.mpp, tile=tile, quality=quality)
    return {
        "slide_id": spec.slide_id, "status": "written",
        "tissue_pct": round(100 * layout.tissue_area / (spec.width * spec.height), 1),
        "tumor_pct_of_tissue": round(100 * sum(p.area for p in layout.tumor) / max(layout.tissue_area, 1), 2),
        "n_tumor": len(layout.tumor), "n_lookalike": len(layout.lookalike),
        "seconds": round(time.perf_counter() - start, 2),
    }


def write_cohort(out: str | Path, config: CohortConfig = CohortConfig(), num_workers: int = 1,
                 progress: bool = True) -> CohortPaths:
    """Write (or finish writing) the cohort under ``out``; slides whose TIFF and XML exist are skipped."""
    root = Path(out)
    paths = CohortPaths(root, root / "slides", root / "slides.csv", root / "labels.csv", root / "annotations")
    paths.slides.mkdir(parents=True, exist_ok=True)
    paths.annotations.mkdir(parents=True, exist_ok=True)
    for folder in (paths.slides, paths.annotations):
        remove_stale_temporaries(folder)  # left by a killed run; finished files are never temporaries
    plan = plan_cohort(config)
    _record_settings(root / SETTINGS_NAME, config)
    todo = [slide_spec(row, config) for row in plan.to_dict("records")
            if not ((paths.slides / f"{row['slide_id']}.tiff").is_file()
                    and (paths.annotations / f"{row['slide_id']}.xml").is_file())]
    summary = {sid: {"slide_id": sid, "status": "skipped"} for sid in plan["slide_id"]}
    args = (paths.slides, paths.annotations, config.tile, config.quality)
    bar = tqdm(total=len(todo), desc="synthetic slides", unit="slide", disable=not progress)
    if num_workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            for row in pool.map(write_slide, todo, *[[a] * len(todo) for a in args]):
                summary[row["slide_id"]] = row
                bar.update()
    else:
        for spec in todo:
            summary[spec.slide_id] = write_slide(spec, *args)
            bar.update()
    bar.close()
    _write_csv(paths.labels_csv, plan.drop(columns=["mpp", "width", "height", "seed"]))
    _write_csv(paths.slides_csv, pd.DataFrame({
        "slide_id": plan["slide_id"], "path": [f"slides/{sid}.tiff" for sid in plan["slide_id"]], "mpp": plan["mpp"],
    }))
    paths.summary = plan[["slide_id", "label", "split", "mpp", "width", "height"]].merge(
        pd.DataFrame(list(summary.values())), on="slide_id")
    return paths


def _record_settings(path: Path, config: CohortConfig) -> None:
    """Write the settings next to the cohort; refuse to resume a cohort made with different ones."""
    settings = json.loads(json.dumps(asdict(config)))  # tuples as lists, as they read back
    if path.is_file():
        previous = json.loads(path.read_text()).get("config")
        # A setting missing from an older file was not an option then: it had its default value.
        previous = {**json.loads(json.dumps(asdict(CohortConfig()))), **(previous or {})}
        if previous != settings:
            changed = sorted(k for k in settings if (previous or {}).get(k) != settings[k])
            raise InputError(f"{path}: this folder holds a cohort written with other settings ({', '.join(changed)}); "
                             "use a new --out or delete the folder")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"config": settings, "hnm_mil_version": package_version()}, indent=1))


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def config_from(preset: str = "demo", **overrides) -> CohortConfig:
    """A preset with the given (non-None) fields replaced."""
    if preset not in PRESETS:
        raise InputError(f"--preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    known = set(asdict(PRESETS[preset]))
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None and k in known}).check()
