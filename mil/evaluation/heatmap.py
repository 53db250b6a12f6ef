"""``mil heatmap``: patch scores painted on slide thumbnails, from stored coordinates and scores only.

Each PNG explains itself: its title names the slide, its label, the slide score, the split and the mining round;
three panels show the bare thumbnail, each patch's rank within the slide (where on this slide the model looks)
and the score on an absolute scale (how sure it is, comparable across slides: sigmoid of the tumor logit, or for
attention the share relative to uniform, N·a / (1 + N·a), so 0.5 is exactly 1/N), each with a labelled colour
bar. Annotation outlines are drawn, with a legend, when they exist. Optionally the top-K patches are exported as
QuPath detections (GeoJSON, level-0 pixels); every patch as QuPath tiles, and the mined selection, come from
``mil qupath``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit
from jsonargparse import ActionConfigFile, ArgumentParser
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from tqdm import tqdm

from features.errors import InputError
from features.store import atomic_path, find_feature_files
from mil.evaluation.patch_truth import patch_size_level0
from mil.evaluation.qupath import top_k_geojson  # lives in qupath.py; importable from here as before
from mil.patch_scores import find_patch_scores, read_patch_scores

log = logging.getLogger(__name__)

ALPHA = 0.45  # the tissue stays legible under the colours; the first panel shows it bare
COLOURMAP = "turbo"
OUTLINES = {"tumor": (255, 0, 255), "lookalike": (0, 90, 255), "exclusion": (120, 120, 120)}


def absolute_values(values: np.ndarray, score: str) -> np.ndarray:
    """Scores on a fixed [0, 1] scale: sigmoid of instance logits, or attention relative to the uniform share."""
    values = np.asarray(values, dtype=np.float64)
    if score in {"instance", "scores"}:
        return expit(values)
    weights = values
    if len(values) and (values.min() < 0 or abs(values.sum() - 1.0) > 1e-3):  # raw attention logits
        weights = np.exp(values - values.max())
        weights /= weights.sum()
    share = len(values) * weights
    return share / (1.0 + share)


def relative_range(values: np.ndarray, clip_percent: float = 1.0) -> tuple[float, float]:
    """The per-slide colour range: the 1st to 99th percentile, so a handful of extreme patches cannot squeeze
    every other patch into one colour."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return 0.0, 0.0
    low, high = np.percentile(values, [clip_percent, 100.0 - clip_percent])
    return float(low), float(high)


def relative_values(values: np.ndarray, clip_percent: float = 1.0) -> np.ndarray:
    """Scores scaled to [0, 1] within the slide over :func:`relative_range` (0.5 everywhere when it is empty)."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return values
    low, high = relative_range(values, clip_percent)
    span = high - low
    return np.clip((values - low) / span, 0.0, 1.0) if span > 0 else np.full_like(values, 0.5)


def paint(values: np.ndarray, coords: np.ndarray, size_level0: int, scale: tuple[float, float],
          shape: tuple[int, int]) -> np.ndarray:
    """A (H, W) map at thumbnail resolution: each patch's square holds its value, NaN where no patch lies.

    Overlapping patches keep the highest value, so a hot patch is never hidden by a neighbour.
    """
    grid = np.full(shape, np.nan)
    sx, sy = scale
    for (x, y), value in zip(coords, values):
        x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        x1 = max(x0 + 1, int(np.ceil((x + size_level0) * sx)))
        y1 = max(y0 + 1, int(np.ceil((y + size_level0) * sy)))
        block = grid[max(y0, 0):y1, max(x0, 0):x1]
        np.fmax(block, value, out=block)
    return grid


def overlay(thumbnail: np.ndarray, grid: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Blend the colour-mapped grid onto the thumbnail where patches lie."""
    colours = colormaps[COLOURMAP](np.nan_to_num(grid, nan=0.0))[..., :3] * 255.0
    mask = ~np.isnan(grid)[..., None]
    blended = np.where(mask, (1 - alpha) * thumbnail + alpha * colours, thumbnail)
    return np.clip(blended, 0, 255).astype(np.uint8)


RANK_LABEL = "rank within this slide (0 = lowest, 1 = highest score)"
ABSOLUTE_LABELS = {"instance": "P(tumor) = sigmoid(patch logit)",
                   "attention": "attention share N·a / (1 + N·a)   (0.5 = uniform)"}


def rank_values(values: np.ndarray) -> np.ndarray:
    """Each patch's rank within its slide as a fraction in (0, 1]: where on this slide the model looks, immune
    to a few extreme scores."""
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=np.float64)
    return rankdata(values) / len(values) if len(values) else values


def title_of(slide_id: str, info: dict[str, Any]) -> str:
    """``slide_007 | label tumor | slide score 0.93 | split test | round 1`` from what the run recorded."""
    parts = [slide_id]
    if info.get("label") is not None:
        parts.append(f"label {info['label']}")
    if info.get("score") is not None:
        parts.append(f"slide score {float(info['score']):.3f}")
    for key in ("split", "round"):
        if info.get(key) is not None:
            parts.append(f"{key} {info[key]}")
    return "  |  ".join(parts)


def render(thumbnail: Image.Image, level0_size: tuple[int, int], coords: np.ndarray, values: np.ndarray,
           size_level0: int, score: str, polygons: dict[str, list[Any]] | None = None,
           title: str = "") -> Figure:
    """The figure for one slide: the plain thumbnail, the per-slide rank and the absolute score over it, each
    with a labelled colour bar; annotation outlines with a legend; the title says which slide and run."""
    pixels = np.asarray(thumbnail.convert("RGB"), dtype=np.float64)
    scale = (thumbnail.width / level0_size[0], thumbnail.height / level0_size[1])
    shape = (thumbnail.height, thumbnail.width)
    panels = [("slide", pixels.astype(np.uint8), None),
              ("per-slide rank", overlay(pixels, paint(rank_values(values), coords, size_level0, scale, shape)),
               RANK_LABEL),
              ("absolute score", overlay(pixels, paint(absolute_values(values, score), coords, size_level0, scale,
                                                       shape)), ABSOLUTE_LABELS[score])]
    aspect = thumbnail.height / thumbnail.width
    figure = Figure(figsize=(3 * 4.2, 4.2 * aspect + 1.4), dpi=max(100, thumbnail.width / 4.2), layout="constrained")
    axes = figure.subplots(1, 3)
    colours = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=COLOURMAP)
    for axis, (name, image, label) in zip(axes, panels):
        axis.imshow(image, interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.set_axis_off()
        bar = figure.colorbar(colours, ax=axis, orientation="horizontal", fraction=0.05, pad=0.02)
        bar.set_label(label or "", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        bar.ax.set_visible(bool(label))  # the bare thumbnail keeps the same size as the panels beside it
        for group, colour in OUTLINES.items():
            for polygon in (polygons or {}).get(group, []):
                ring = np.asarray(polygon.exterior.coords) * np.asarray(scale)
                axis.plot(ring[:, 0], ring[:, 1], color=np.asarray(colour) / 255.0, linewidth=1.2, label=group)
    drawn = [group for group in OUTLINES if (polygons or {}).get(group)]
    if drawn:
        handles = [Line2D([], [], color=np.asarray(OUTLINES[g]) / 255.0, linewidth=2, label=f"{g} annotation")
                   for g in drawn]
        figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _slide_thumbnail(path: Path, max_size: int) -> tuple[Image.Image, tuple[int, int]]:
    from features.slides import open_slide

    slide = open_slide(path)
    try:
        return slide.get_thumbnail((max_size, max_size)).convert("RGB"), tuple(slide.dimensions)
    finally:
        slide.close()


def _annotation_polygons(folder: str | None, slide_id: str) -> dict[str, list[Any]]:
    if not folder:
        return {}
    from features.annotations import find_annotation, read_polygons

    path = find_annotation(Path(folder), slide_id)
    return read_polygons(path) if path is not None else {}


def run_round(run: str | None, round_: int | None) -> int | None:
    """The mining round: as given, else from a ``round_<k>`` folder in the run's path (``mil hnm`` layout)."""
    if round_ is not None or not run:
        return round_
    found = [int(part[6:]) for part in Path(run).resolve().parts if re.fullmatch(r"round_\d+", part)]
    return found[-1] if found else None


def slide_info(run: str | None) -> dict[str, dict[str, Any]]:
    """Label, slide score and split per slide from the run's predictions CSVs, for the titles."""
    import pandas as pd

    info: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(run).glob("predictions*.csv")) if run else []:
        table = pd.read_csv(path, dtype={"slide_id": str})
        if {"slide_id", "score"} <= set(table.columns):
            for row in table.to_dict("records"):
                info.setdefault(str(row["slide_id"]), {k: row.get(k) for k in ("label", "score", "split")})
    return info


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mil heatmap", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--run", type=str | None, default=None, help="run directory (uses its patch_scores/)")
    parser.add_argument("--scores", type=str | None, default=None, help="folder of patch score files")
    parser.add_argument("--slides", type=str, required=True, help="slide folder, or CSV with slide_id,path")
    parser.add_argument("--features", type=str, required=True, help="features folder (patch geometry)")
    parser.add_argument("--patch_size_level0", type=int | None, default=None,
                        help="patch side in level-0 pixels, for feature files without geometry (CLAM)")
    parser.add_argument("--annotations", type=str | None, default=None, help="folder of ASAP XML / GeoJSON")
    parser.add_argument("--out", type=str, required=True, help="output folder for PNGs (and GeoJSON)")
    parser.add_argument("--slide_ids", type=list[str] | None, default=None, help="only these slides")
    parser.add_argument("--score", type=str, default="instance", help="instance (tumor logits) or attention")
    parser.add_argument("--thumbnail_size", type=int, default=1024, help="longest thumbnail side in pixels")
    parser.add_argument("--geojson_top_k", type=int, default=0, help="also export the top-K patches as GeoJSON")
    parser.add_argument("--overwrite", type=bool, default=False, help="redo slides whose outputs exist")
    parser.add_argument("--round", type=int | None, default=None,
                        help="mining round for the titles; default: from a round_<k> folder in the --run path")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if bool(args.run) == bool(args.scores):
        raise InputError("mil heatmap: pass exactly one of --run DIR or --scores DIR")
    if args.score not in {"instance", "attention"}:
        raise InputError(f"--score {args.score!r}: choose instance or attention")
    from features.slides import list_slides

    score_files = find_patch_scores(args.run or args.scores)
    slides = {ref.slide_id: ref.path for ref in list_slides(args.slides)}
    feature_files = find_feature_files(args.features)
    wanted = list(score_files) if args.slide_ids is None else list(args.slide_ids)
    unknown = [s for s in wanted if s not in score_files]
    if unknown:
        raise InputError(f"--slide_ids {unknown[:5]}: no patch scores for them in {args.run or args.scores}")
    info, round_ = slide_info(args.run), run_round(args.run, args.round)
    out = Path(args.out)
    written = skipped = 0
    for slide_id in tqdm(wanted, desc="heatmaps", unit="slide"):
        png = out / f"{slide_id}_{args.score}.png"
        geojson = out / f"{slide_id}_top{args.geojson_top_k}.geojson"
        done = png.is_file() and (not args.geojson_top_k or geojson.is_file())
        if done and not args.overwrite:
            skipped += 1
            continue
        if slide_id not in slides or slide_id not in feature_files:
            log.warning("%s: no slide or no features file; skipped", slide_id)
            print(f"warning: {slide_id}: no slide in --slides or no features file in --features; skipped")
            continue
        coords, values = read_patch_scores(score_files[slide_id], args.score)
        size = patch_size_level0(feature_files[slide_id], args.patch_size_level0)
        thumbnail, level0_size = _slide_thumbnail(slides[slide_id], args.thumbnail_size)
        figure = render(thumbnail, level0_size, coords, values, size, args.score,
                        _annotation_polygons(args.annotations, slide_id),
                        title_of(slide_id, {**info.get(slide_id, {}), "round": round_}))
        save_figure(figure, png)
        if args.geojson_top_k:
            collection = top_k_geojson(coords, values, size, args.geojson_top_k, slide_id, args.score)
            with atomic_path(geojson) as tmp:
                tmp.write_text(json.dumps(collection, indent=1))
        written += 1
    print(f"heatmaps: {written} written, {skipped} already done, in {out}")
