"""Choosing patches for encoder fine-tuning: self-paced positives, hard negatives, plain negatives.

Input is one long table of training-slide patches (``slide_id, x, y, score, label, split``) built from a run's
``patch_scores/`` and the labels CSV. Only training slides may enter it: a validation slide whose patches
shaped the encoder would make every later validation number optimistic, so :func:`select_patches` refuses any
other split rather than silently dropping it.

Hard negatives are the ``neg_ratio`` highest-scoring patches of normal slides: patches the slide model thinks
look like tumor although the slide label proves they are not (look-alikes, artefacts). Because a fine-tuning
epoch is one pass over this pool, ``neg_ratio`` also sets the cost of fine-tuning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from features.errors import InputError
from mil.data.labels import DEFAULT_LABEL_MAP, read_labels
from mil.patch_scores import find_patch_scores
from mil.patch_scores import read_patch_scores as read_patch_scores_file
from mil.mining.pseudo_labels import PositiveSchedule, normal_calibrated_threshold, pseudo_positive_mask, sigmoid
from mil.mining.quality import candidate_pool
from mil.mining.twins import TwinFilter, TwinResult, near_hard_negatives, twin_test

log = logging.getLogger(__name__)


@dataclass
class MiningConfig:
    """Every threshold and ratio of mining; the defaults follow ItS2CLR / HNM-WSI."""

    threshold: float = 0.3
    """On sigmoid(logit): patch probability a tumor-slide patch needs to be a candidate."""
    normal_quantile: float | None = None
    """Raise the threshold to this quantile of normal-slide patch probabilities (None: the fixed threshold only): a
    candidate must outscore almost every patch of a normal slide, look-alikes included. Off by default: it shrinks
    the pool but did not raise precision over the twin test (docs/method.md)."""
    max_candidate_share: float = 0.5
    """Warn (stdout, selection_quality.json) when candidates exceed this share of all tumor-slide patches: tumor
    rarely covers half of all tumor-slide tissue (metastases are mostly small), so such a pool is mostly not tumor."""
    positives: PositiveSchedule = field(default_factory=PositiveSchedule)
    """Self-paced schedule of the positive fraction."""
    positives_by_site: bool | Literal["auto"] = "auto"
    """true: apply the positive fraction within each site (the labels CSV's ``site`` column), at least one positive
    per site with candidates, so a site whose stain lifts its scores no longer supplies every positive. auto: rank
    over the cohort, and take them within each site only when those positives come from half or fewer of the
    training tumor slides' sites (the site check's warning); it mended three of the four synthetic cohorts where
    that happened and changes nothing elsewhere (docs/method.md). false: always over the cohort."""
    neg_ratio: float = 0.1
    """Fraction of all normal-slide training patches kept as hard negatives (top by score)."""
    random_ratio: float = 0.0
    """Extra fraction of normal-slide patches drawn at random as plain negatives."""
    min_hard_negatives: int = 1
    """At least this many, so tiny cohorts still give a hard-negative phase."""
    max_positives: int | None = None
    """Caps keep a fine-tuning epoch bounded on huge cohorts."""
    max_hard_negatives: int | None = None
    """Cap on hard negatives (None = no cap)."""
    twins: TwinFilter = field(default_factory=TwinFilter)
    """Candidates with a close twin on a normal slide are not trusted as positives (mil/mining/twins.py); needs the
    round's features. ``twins.k = 0`` turns the test off."""
    seed: int = 0
    """Seeds random negatives and sampling."""


def read_patch_scores(folder: str | Path, slide_ids: set[str] | None = None) -> pd.DataFrame:
    """A run's patch-scores files -> one table ``slide_id, x, y, score`` (raw logits)."""
    frames = []
    for slide_id, path in find_patch_scores(folder).items():
        if slide_ids is not None and slide_id not in slide_ids:
            continue
        coords, scores = read_patch_scores_file(path)
        frames.append(pd.DataFrame({"slide_id": slide_id, "x": coords[:, 0], "y": coords[:, 1], "score": scores}))
    if not frames:
        return pd.DataFrame({"slide_id": [], "x": [], "y": [], "score": []})
    return pd.concat(frames, ignore_index=True)


def read_slide_labels(path: str | Path, fold: int | None = None, label_map: dict[str, int] | None = None) -> pd.DataFrame:
    """``slide_id, label, split`` from a labels CSV (``split`` column, or ``fold_<k>`` with ``fold=k``).

    Parsing and checks are the training data's (:func:`mil.data.labels.read_labels`); mining adds that the
    labels be binary and that the split to mine from is present. ``label_map`` extends the default binary map.
    """
    mapping = {**DEFAULT_LABEL_MAP, **{str(k).lower(): int(v) for k, v in (label_map or {}).items()}}
    table = read_labels(path, mapping)
    split_column = "split" if fold is None else f"fold_{fold}"
    if split_column not in table.columns:
        raise InputError(f"{path}: no '{split_column}' column; mining needs slide_id, label and the split "
                         "(a 'split' column, or fold_<k> columns with --fold k)")
    if not table["label"].isin([0, 1]).all():
        bad = sorted(set(table.loc[~table["label"].isin([0, 1]), "label"]))[:5]
        raise InputError(f"{path}: labels {bad} are not binary; map them with --label_map")
    frame = pd.DataFrame({"slide_id": table["slide_id"].to_numpy(), "label": table["label"].to_numpy(dtype=int),
                          "split": table[split_column].to_numpy()})
    if "site" in table.columns:  # the slide's hospital or scanner: mining reads it for its site checks
        frame["site"] = table["site"].str.strip().to_numpy()
    return frame


def training_patch_table(scores: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Join patch scores with slide labels, keeping training slides only (matched by slide_id, never by order)."""
    train = labels[labels["split"] == "train"]
    table = scores.merge(train, on="slide_id", how="inner", validate="many_to_one")
    dropped = sorted(set(scores["slide_id"]) - set(train["slide_id"]))
    if dropped:
        log.info("mining ignores %d slide(s) outside the training split (e.g. %s)", len(dropped), dropped[:3])
    return table


def select_patches(table: pd.DataFrame, config: MiningConfig, round_index: int = 0,
                   features: str | Path | None = None) -> pd.DataFrame:
    """The selection (the columns of docs/formats.md + ``prob``, ``slide_label``) from a training patch table.

    With ``features`` (the folder the scored model read), positive candidates with a normal-slide twin are
    dropped first; how many is in ``selection.attrs["positive_twins_removed"]``, the test's label-free report in
    ``selection.attrs["twin_test"]`` (None: not run). Then positives with a hard negative nearer than their
    ``twins.hard_negative_k``-th fellow positive are dropped (``attrs["positives_near_hard_negatives"]``; the
    test's report, with whether it was applied, in ``attrs["near_hard_test"]``).
    """
    if len(table) and set(table["split"]) != {"train"}:
        raise ValueError(f"mining got non-training slides (splits {sorted(set(table['split']))}); only train is allowed")
    table = table.reset_index(drop=True)
    probs = sigmoid(table["score"].to_numpy())
    slide_ids = table["slide_id"].to_numpy()
    labels = table["label"].to_numpy()
    fraction = config.positives.fraction(round_index)
    threshold = normal_calibrated_threshold(probs, labels, config.threshold, config.normal_quantile)
    pool = candidate_pool(labels, probs, threshold, config.max_candidate_share)
    candidates = np.flatnonzero((labels == 1) & (probs >= threshold))
    twins = _twin_test(table, candidates, config, round_index, features)
    eligible, removed = _eligible(twins, candidates, len(table))
    sites = table["site"].to_numpy(dtype=object).astype(str) if "site" in table.columns else None
    tumor_slide_sites = None if sites is None else pd.unique(sites[labels == 1])
    by_site = sites is not None and config.positives_by_site is True
    positive = pseudo_positive_mask(slide_ids, labels, probs, threshold, fraction, eligible,
                                    sites if by_site else None)
    by_score_sites = None
    if config.positives_by_site == "auto" and sites is not None and few_sites(sites[positive], tumor_slide_sites):
        by_score_sites, by_site = sites[positive], True
        positive = pseudo_positive_mask(slide_ids, labels, probs, threshold, fraction, eligible, sites)
    positive = _cap(positive, probs, config.max_positives)
    normal = np.flatnonzero(labels == 0)
    hard = _top_fraction(normal, probs, config.neg_ratio, config.min_hard_negatives, config.max_hard_negatives)
    tumor_slides = int(pd.unique(slide_ids[labels == 1]).size)
    positive, near_hard = _drop_near_hard_negatives(table, positive, hard, config, features, tumor_slides)
    few = few_positives(int(positive.sum()), tumor_slides)
    rest = np.setdiff1d(normal, hard)
    rng = np.random.default_rng([config.seed, round_index])
    n_random = min(len(rest), int(round(config.random_ratio * len(normal))))
    plain = np.sort(rng.choice(rest, size=n_random, replace=False)) if n_random else np.zeros(0, dtype=np.int64)
    kinds = np.full(len(table), "", dtype=object)
    kinds[positive] = "positive"
    kinds[hard] = "hard_negative"
    kinds[plain] = "negative"
    chosen = table.assign(prob=probs, kind=kinds)[kinds != ""]
    selection = pd.DataFrame({
        "slide_id": chosen["slide_id"], "x": chosen["x"], "y": chosen["y"],
        "pseudo_label": (chosen["kind"] == "positive").astype(int), "score": chosen["score"],
        "kind": chosen["kind"], "prob": chosen["prob"], "slide_label": chosen["label"], "round": round_index,
    })
    for column in ("truth",):
        if column in chosen.columns:
            selection[column] = chosen[column]
    selection = selection.reset_index(drop=True)
    selection.attrs["positive_twins_removed"] = removed
    selection.attrs["twin_test"] = None if twins is None else twins.report()
    selection.attrs["positives_near_hard_negatives"] = None if near_hard is None else (
        near_hard["flagged"] if near_hard["applied"] else 0)
    selection.attrs["near_hard_test"] = near_hard
    selection.attrs["candidate_pool"] = pool
    selection.attrs["positive_count"] = few
    selection.attrs["site_mix"] = None if sites is None else site_mix(sites[positive], sites[hard], tumor_slide_sites,
                                                                      by_site, by_score_sites)
    return selection


def site_mix(positive_sites: np.ndarray, hard_sites: np.ndarray, tumor_slide_sites: np.ndarray,
             by_site: bool = False, by_score_sites: np.ndarray | None = None) -> dict:
    """Label-free check: do the positives span the sites (hospitals, scanners) of the training tumor slides?

    Fine-tuning learns tumor from the positives. Positives from one site teach tumor as that site's stain shows
    it: on a synthetic cohort whose 10 positives all came from one of three sites, the refreshed encoder scored
    that site's tumor far above normal tissue and the other sites' tumor below it (patch AUC 0.88 -> 0.58).
    Taking the positives within each site (``by_site``: ``mining.positives_by_site``) mended it; taking the hard
    negatives from the positives' sites did not (docs/method.md). ``by_score_sites``: the sites of the positives
    ranked over the cohort, where ``positives_by_site: auto`` replaced them (reported as ``by_score`` and in
    ``note``). ``overlap``, the share the site mixes of positives and hard negatives have in common (1: the same
    mix, 0: no site in common), is reported beside it.
    """
    positive, hard = _counts(positive_sites), _counts(hard_sites)
    overlap = float(np.minimum(positive / positive.sum(), hard / hard.sum()).fillna(0).sum()) if (
        len(positive) and len(hard)) else None
    tumor_sites = sorted(map(str, tumor_slide_sites))
    covered = [site for site in tumor_sites if site in positive.index]
    warning = note = None
    if few_sites(positive_sites, tumor_sites):
        warning = (f"positives come from {len(covered)} of the {len(tumor_sites)} sites of the training tumor slides "
                   f"({_mix(positive) or 'none'}): fine-tuning learns tumor as {'/'.join(covered) or 'no site'} "
                   "shows it; " + ("the other sites have no candidates, so compare the rounds on their validation "
                                   "slides" if by_site else "set mining.positives_by_site auto or true"))
    by_score = None if by_score_sites is None else _counts(by_score_sites)
    if by_score is not None:
        note = (f"positives taken within each site ({_mix(positive)}): ranked over the cohort they came from "
                f"{len(by_score)} of the {len(tumor_sites)} training tumor slides' sites ({_mix(by_score)})")
    return {"positives": {k: int(v) for k, v in positive.items()}, "hard_negatives": {k: int(v) for k, v in hard.items()},
            "tumor_slide_sites": tumor_sites, "overlap": overlap, "by_site": bool(by_site),
            "by_score": None if by_score is None else {k: int(v) for k, v in by_score.items()}, "note": note,
            "warning": warning}


def few_sites(positive_sites: np.ndarray, tumor_slide_sites: np.ndarray) -> bool:
    """True when the positives come from half or fewer of the training tumor slides' sites (two or more sites)."""
    tumor_sites = set(map(str, tumor_slide_sites))
    covered = tumor_sites & set(map(str, positive_sites))
    return len(tumor_sites) >= 2 and 2 * len(covered) <= len(tumor_sites)


def _counts(sites: np.ndarray) -> pd.Series:
    return pd.Series(sites, dtype=object).astype(str).value_counts()


def _mix(counts: pd.Series) -> str:
    return ", ".join(f"{site} {n}" for site, n in counts.items())


def few_positives(positives: int, tumor_slides: int) -> dict:
    """Label-free check: fewer positives than training tumor slides?

    Every training tumor slide holds tumor by its label, so a selection that trusts fewer patches than there are
    such slides leaves some of them without a single tumor example, and the fine-tuning learns tumor from a handful
    of patches (on small synthetic cohorts, 1-4 positives, the refresh lost patch AUC or found no tumor at all).
    """
    warning = None
    if tumor_slides and positives < tumor_slides:
        warning = (f"only {positives} positive(s) for {tumor_slides} training tumor slides: the fine-tuning learns "
                   "tumor from very few patches; compare the rounds on more validation slides or folds before "
                   "trusting the refresh (chosen_on_val keeps the earlier round on a tie)")
    return {"positives": positives, "tumor_slides": tumor_slides, "warning": warning}


def _twin_test(table: pd.DataFrame, candidates: np.ndarray, config: MiningConfig, round_index: int,
               features: str | Path | None) -> TwinResult | None:
    """The twin test on the positive candidates (None: no features, or ``twins.k = 0``)."""
    if features is None or config.twins.k <= 0:
        return None
    return twin_test(table, candidates, features, config.twins, seed=config.seed + round_index)


def _eligible(twins: TwinResult | None, candidates: np.ndarray, n_rows: int) -> tuple[np.ndarray | None, int | None]:
    """Eligibility mask after the twin test, and how many candidates it removed (None: test not run).

    Candidates that fail are never let back in: when none passes, no candidate is eligible (and
    :func:`pseudo_positive_mask` falls back to each tumor slide's top patch, with a warning).
    """
    if twins is None:
        return None, None
    eligible = np.ones(n_rows, dtype=bool)
    eligible[candidates[~twins.free]] = False
    return eligible, int((~twins.free).sum())


def _drop_near_hard_negatives(table: pd.DataFrame, positive: np.ndarray, hard: np.ndarray, config: MiningConfig,
                              features: str | Path | None, tumor_slides: int) -> tuple[np.ndarray, dict | None]:
    """Positives without a hard negative among their nearest fellows, and the test's report (None: not run).

    The test is not applied when it would leave fewer positives than there are training tumor slides: every such
    slide holds tumor by its label, so a rule that trusts almost none of them has judged the features, not the
    patches (on a demo cohort it left 4 positives, and the refresh broke). The positives then stay as the twin
    test left them, and the report says so in one label-free line.
    """
    k = config.twins.hard_negative_k
    if features is None or k <= 0 or not positive.any():
        return positive, None
    rows = np.flatnonzero(positive)
    near = near_hard_negatives(table, rows, hard, features, k)
    kept = int(len(rows) - near.sum())
    applied = kept >= tumor_slides or kept == len(rows)  # flagging none changes nothing, however few they are
    warning = None if applied else (
        f"the near-hard-negative test (k={k}) would keep {kept} of {len(rows)} positives, fewer than the "
        f"{tumor_slides} training tumor slides; not applied (positives as the twin test left them)")
    report = {"k": k, "positives": int(len(rows)), "flagged": int(near.sum()), "applied": applied,
              "warning": warning}
    if not applied:
        return positive, report
    out = positive.copy()
    out[rows[near]] = False
    return out, report


def _top_fraction(rows: np.ndarray, probs: np.ndarray, ratio: float, minimum: int, cap: int | None) -> np.ndarray:
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    keep = min(len(rows), max(minimum, int(round(ratio * len(rows)))))
    if cap is not None:
        keep = min(keep, cap)
    order = rows[np.lexsort((rows, -probs[rows]))]
    return np.sort(order[:keep])


def _cap(mask: np.ndarray, probs: np.ndarray, cap: int | None) -> np.ndarray:
    if cap is None or mask.sum() <= cap:
        return mask
    rows = np.flatnonzero(mask)
    keep = rows[np.lexsort((rows, -probs[rows]))][:cap]
    capped = np.zeros_like(mask)
    capped[keep] = True
    return capped
