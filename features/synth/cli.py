"""``features synth``: write a synthetic H&E-like cohort (slides, CSVs, annotations) or a point-annotated set."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from features.synth.cohort import PRESETS, config_from, write_cohort
from features.synth.points import POINT_PRESETS, point_config, write_point_cohort


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="features synth", description=__doc__.split(": ", 1)[1], exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_argument("--out", type=str, required=True, help="folder to write the cohort into (created)")
    parser.add_argument("--mode", type=Literal["slides", "points"], default="slides",
                        help="slides: WSI cohort with polygons; points: mitosis-like images with a COCO file")
    parser.add_argument("--preset", type=Literal[tuple(dict.fromkeys([*PRESETS, *POINT_PRESETS]))], default="demo",
                        help="starting sizes: slides: demo (24 slides 3000x2500), mimic (as demo, look-alikes with "
                             "tumor's look, commoner on tumor slides) or tiny (6 slides 1200x1000); "
                             "points: demo, tiny or hard (every imposter kind); the options below override it")
    parser.add_argument("--seed", type=Optional[int], default=None, help="same seed, same cohort (default 0)")
    parser.add_argument("--n_slides", type=Optional[int], default=None, help="slides (or images in points mode)")
    parser.add_argument("--width", type=Optional[int], default=None, help="level-0 width in px at --mpp")
    parser.add_argument("--height", type=Optional[int], default=None, help="level-0 height in px at --mpp")
    parser.add_argument("--mpp", type=Optional[float], default=None, help="microns per pixel of level 0 (0.5)")
    parser.add_argument("--high_res_fraction", type=Optional[float], default=None,
                        help="share of slides scanned at mpp/2 with twice the pixels (demo 0.125)")
    parser.add_argument("--tumor_fraction", type=Optional[float], default=None, help="share of tumor slides (0.5)")
    parser.add_argument("--tumor_area", type=Optional[tuple[float, float]], default=None,
                        help="min, max tumor share of tissue on a tumor slide (0.02, 0.06)")
    parser.add_argument("--lookalike_area", type=Optional[tuple[float, float]], default=None,
                        help="min, max look-alike share of tissue on every slide (0.015, 0.04)")
    parser.add_argument("--tumor_lookalike_area", type=Optional[tuple[float, float]], default=None,
                        help="min, max look-alike share of tissue on tumor slides (default: as --lookalike_area)")
    parser.add_argument("--lookalike_mimicry", type=Optional[float], default=None,
                        help="0-1: how far look-alikes take tumor's colour, size and density (0); outline and "
                             "chromatin stay different")
    parser.add_argument("--coverage", type=Optional[tuple[float, float]], default=None,
                        help="min, max tissue share of the slide (0.3, 0.6)")
    parser.add_argument("--paired_fraction", type=Optional[float], default=None,
                        help="share of slides from cases that have two slides (0.34)")
    parser.add_argument("--n_sites", type=Optional[int], default=None, help="number of sites, 1-4 (3)")
    parser.add_argument("--site_cast", type=Optional[float], default=None,
                        help="scales how far each site's colour cast is from neutral, 0-5 (1: a few per cent)")
    parser.add_argument("--folds", type=Optional[int], default=None, help="K >= 3 adds fold_0..fold_{K-1} columns")
    parser.add_argument("--tile", type=Optional[int], default=None, help="TIFF tile size (256)")
    parser.add_argument("--quality", type=Optional[int], default=None, help="JPEG quality (90)")
    parser.add_argument("--num_workers", type=int, default=1, help="slides rendered in parallel processes")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = {k: v for k, v in vars(args).items() if k not in {"config", "out", "mode", "preset", "num_workers",
                                                                  "__path__"}}
    start = time.perf_counter()
    if args.mode == "points":
        written = _points(Path(args.out), args.preset, options)
        print(f"wrote {written} point-annotated images to {args.out} in {time.perf_counter() - start:.1f}s")
        return
    config = config_from(args.preset, **options)
    paths = write_cohort(args.out, config, num_workers=args.num_workers)
    table = paths.summary.fillna("")
    print(table.to_string(index=False))
    counts = table["status"].value_counts()
    print(f"{len(table)} slides ({counts.get('written', 0)} written, {counts.get('skipped', 0)} already there; "
          f"{(table['label'] == 'tumor').sum()} tumor) in {time.perf_counter() - start:.1f}s -> "
          f"{paths.slides_csv}, {paths.labels_csv}, {paths.annotations}/")


def _points(out: Path, preset: str, options: dict) -> int:
    config = point_config(preset, n_images=options.get("n_slides"), width=options.get("width"),
                          height=options.get("height"), mpp=options.get("mpp"), seed=options.get("seed"),
                          tile=options.get("tile"), quality=options.get("quality"))
    write_point_cohort(out, config)
    return config.n_images
