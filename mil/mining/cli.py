"""``mil mine``: a selection file (and its quality, given annotations) from a run's training patch scores.

    mil mine --scores runs/r0/patch_scores --labels cohort/labels.csv --out r0/selection.csv \
        --round 0 --mining.neg_ratio 0.1 [--annotations cohort/annotations --coords r0/features]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from features.errors import InputError
from features.options import parse
from features.provenance import refuse_other_features
from features.selection import counts_by_kind, write_selection
from features.store import coords_path, folder_settings, read_attrs
from mil.mining.mine import MiningConfig, read_patch_scores, read_slide_labels, select_patches, training_patch_table
from mil.mining.quality import selection_quality, truth_categories, write_quality
from mil.patch_scores import find_patch_scores, scored_feature_settings

QUALITY_NAME = "selection_quality.json"


@dataclass
class MineArgs:
    """What ``mil mine`` reads and writes."""

    scores: str
    """A run directory or its patch_scores/ folder (from `mil predict --data.predict_split train`)."""
    labels: str
    """Labels CSV: slide_id,label and split (or fold_<k>)."""
    out: str
    """Selection CSV to write; selection_quality.json (label-free pool check + quality) goes next to it."""
    fold: int | None = None
    """Fold column fold_<k> of the labels CSV to mine; None = the split column."""
    round: int = 0
    """Mining round: sets the self-paced positive fraction r(round) and the random seed."""
    annotations: str | None = None
    """Folder of ASAP XML / GeoJSON; enables selection quality."""
    coords: str | None = None
    """Feature store (or coords folder) giving each slide's patch size at level 0."""
    features: str | None = None
    """The feature folder the scored model read: enables the twin test on positives."""
    label_map: dict[str, int] = field(default_factory=dict)
    """Label text -> class index, e.g. {LUAD: 0, LUSC: 1}; default normal/negative=0, tumor/positive=1."""
    mining: MiningConfig = field(default_factory=MiningConfig)
    """Thresholds and ratios of mining."""


def main(argv: list[str] | None = None) -> None:
    mine(parse(MineArgs, argv, "mil mine", __doc__ or ""))


def mine(args: MineArgs) -> pd.DataFrame:
    """Run mining end to end; returns the selection written to ``args.out``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quantile = args.mining.normal_quantile
    if quantile is not None and not 0 <= quantile <= 1:
        raise InputError(f"--mining.normal_quantile {quantile}: use a quantile between 0 and 1 (e.g. 0.999) or null")
    labels = read_slide_labels(args.labels, args.fold, args.label_map)
    train_ids = set(labels.loc[labels["split"] == "train", "slide_id"])
    if not train_ids:
        raise InputError(f"{args.labels}: no slide has split 'train'; mining uses training slides only")
    if args.features:
        check_scored_features(args.scores, args.features)
    table = training_patch_table(read_patch_scores(args.scores), labels)
    if table.empty:
        raise InputError(f"{args.scores}: no patch scores for any training slide; run `mil predict "
                         "--data.predict_split train` with the same labels CSV")
    if args.annotations:
        sizes = {s: patch_size_level0(args, s) for s in table["slide_id"].unique()}
        table["truth"] = truth_categories(table, args.annotations, sizes)
    selection = select_patches(table, args.mining, args.round, args.features)
    removed = selection.attrs.get("positive_twins_removed")
    near_hard = selection.attrs.get("positives_near_hard_negatives")
    write_selection(args.out, selection)
    counts = counts_by_kind(selection)
    print(f"selection: {args.out}  " + "  ".join(f"{kind}={n}" for kind, n in counts.items())
          + f"  (from {len(table)} patches of {table['slide_id'].nunique()} training slides"
          + ("" if removed is None else f"; {removed} positive candidates dropped for a normal-slide twin")
          + ("" if near_hard is None else f", {near_hard} positives for a nearby hard negative") + ")")
    pool, twins, near_test, count, sites = (selection.attrs[key] for key in (
        "candidate_pool", "twin_test", "near_hard_test", "positive_count", "site_mix"))
    if sites and sites["note"]:
        print(f"note: {sites['note']}", flush=True)
    for warning in (pool["warning"], twins and twins["warning"], near_test and near_test["warning"], count["warning"],
                    sites and sites["warning"]):
        if warning:
            print(f"warning: {warning}", flush=True)
    # Label-free numbers always; precision and composition only where annotations say what each patch is.
    report = {"candidate_pool": pool, "positive_twins_removed": removed, "twin_test": twins,
              "positives_near_hard_negatives": near_hard, "near_hard_test": near_test, "positive_count": count,
              "site_mix": sites}
    if args.annotations:
        report.update(selection_quality(table, selection))
    write_quality(Path(args.out).with_name(QUALITY_NAME), report)
    if args.annotations:
        print(quality_line(report))
    return selection


def check_scored_features(scores: str, features: str) -> None:
    """Refuse a ``--features`` folder of another make than the features the scores came from.

    The twin tests compare patches in ``--features``; features of another encoder would pass every shape check
    and silently decide which positives survive.
    """
    refuse_other_features(scored_feature_settings(find_patch_scores(scores)), folder_settings(features), features,
                          f"the patch scores in {scores} came from features with",
                          "pass the --features folder the scored model read (its run's --data.features)")


def quality_line(report: dict) -> str:
    hard = report["hard_negative_composition"]
    return (f"quality: positive precision {report['positive_precision']:.3f}; hard negatives "
            f"lookalike {hard['lookalike']:.3f} / normal {hard['normal']:.3f} / tumor {hard['tumor']:.3f}; "
            f"look-alike enrichment vs random {report['lookalike_enrichment']:.2f}x")


def patch_size_level0(args: MineArgs, slide_id: str) -> int:
    """Patch side in level-0 pixels: from the store's coords attrs, else from the patch-scores file."""
    candidates = []
    if args.coords:
        root = Path(args.coords)
        candidates += [coords_path(root, slide_id), root / f"{slide_id}.h5", *sorted(root.glob(f"features/*/{slide_id}.h5"))]
    scores = Path(args.scores)
    candidates += [scores / "patch_scores" / f"{slide_id}.h5", scores / f"{slide_id}.h5"]
    for path in candidates:
        if path.is_file():
            size = read_attrs(path).get("patch_size_level0")
            if size:
                return int(np.asarray(size).item())
    raise InputError(f"{slide_id}: patch size at level 0 unknown; pass --coords with the feature store folder")
