"""Cell populations: how many nuclei, where, and of what shape, for each kind of tissue.

Sizes are in microns and converted with the slide's mpp, so a slide scanned at 0.25 mpp shows the same cells
with twice the pixels. The three populations that matter for mining:

- normal lymph node: small, round, dark lymphocyte nuclei, dense with patchy density, plus a few spindle cells;
- tumor: large pleomorphic nuclei (irregular outline, elongated, varying size), vesicular chromatin (dark rim,
  pale centre, a nucleolus), crowded in nests separated by thin stroma;
- look-alike: nuclei nearly as large and of the same average colour, at the same density, on the same lilac
  cytoplasm, so colour and density statistics match tumor; but the nuclei are round, regular and evenly stained,
  each wrapped in a pink halo, and laid out on an even, almost crystalline grid instead of nests.
"""

from __future__ import annotations

import numpy as np

from features.synth.texture import Nuclei, jittered_grid, lookup, smooth_at

# Nuclear colours (RGB at full opacity) and the cytoplasm tint of tumor-like regions.
LYMPHOCYTE_COLOR = np.array([52.0, 30.0, 100.0], dtype=np.float32)
SPINDLE_COLOR = np.array([88.0, 52.0, 130.0], dtype=np.float32)
TUMOR_COLOR = np.array([78.0, 52.0, 140.0], dtype=np.float32)
LOOKALIKE_COLOR = np.array([92.0, 64.0, 150.0], dtype=np.float32)
CYTOPLASM_COLOR = np.array([196.0, 160.0, 218.0], dtype=np.float32)
HALO_COLOR = np.array([238.0, 150.0, 192.0], dtype=np.float32)

# Mean nuclear radius in microns of each population (the look-alike sits between normal and tumor).
LYMPHOCYTE_RADIUS_UM = 2.8
TUMOR_RADIUS_UM = 5.6
LOOKALIKE_RADIUS_UM = 4.8


def _ellipses(rng: np.random.Generator, xy: np.ndarray, radius: np.ndarray, aspect: np.ndarray,
              wobble: float | np.ndarray, rim: float | np.ndarray, nucleolus: float | np.ndarray,
              opacity: float | np.ndarray, grain: float) -> Nuclei:
    n = len(xy)

    def per(value: float | np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.asarray(value, dtype=np.float32), (n,)).copy()

    return Nuclei(
        xy=xy.astype(np.float32),
        a=(radius * np.sqrt(aspect)).astype(np.float32),
        b=(radius / np.sqrt(aspect)).astype(np.float32),
        theta=rng.uniform(0, np.pi, n).astype(np.float32),
        wobble=per(wobble), rim=per(rim), nucleolus=per(nucleolus), opacity=per(opacity), grain=grain,
    )


def lymphocytes(rng: np.random.Generator, where: np.ndarray, mpp: float) -> Nuclei:
    """Dense small dark round nuclei; density drifts over the slide (follicle-like patches)."""
    px = 1.0 / mpp
    points = jittered_grid(rng, where.shape, spacing=6.6 * px, jitter=0.45)
    density = np.clip(0.7 + 0.3 * smooth_at(rng, where.shape, 60 * px, points), 0.15, 1.0)
    points = points[lookup(where, points) & (rng.uniform(size=len(points)) < density)]
    n = len(points)
    radius = LYMPHOCYTE_RADIUS_UM * px * rng.lognormal(0, 0.1, n)
    return _ellipses(rng, points, radius, rng.uniform(1.0, 1.2, n), wobble=0.0, rim=0.0, nucleolus=0.0,
                     opacity=rng.uniform(0.85, 0.97, n), grain=0.08)


def spindles(rng: np.random.Generator, where: np.ndarray, mpp: float) -> Nuclei:
    """Sparse elongated stromal/endothelial nuclei: variety in normal tissue that is not tumor."""
    px = 1.0 / mpp
    points = jittered_grid(rng, where.shape, spacing=40 * px, jitter=0.5)
    points = points[lookup(where, points)]
    n = len(points)
    radius = 2.6 * px * rng.lognormal(0, 0.15, n)
    return _ellipses(rng, points, radius, rng.uniform(3.0, 5.0, n), wobble=0.0, rim=0.0, nucleolus=0.0,
                     opacity=rng.uniform(0.7, 0.9, n), grain=0.1)


def tumor_cells(rng: np.random.Generator, where: np.ndarray, mpp: float) -> Nuclei:
    """Crowded pleomorphic vesicular nuclei in nests."""
    px = 1.0 / mpp
    points = jittered_grid(rng, where.shape, spacing=10.5 * px, jitter=0.4)
    nests = smooth_at(rng, where.shape, 22 * px, points) > -0.7
    keep = lookup(where, points) & (rng.uniform(size=len(points)) < np.where(nests, 0.97, 0.2))
    points = points[keep]
    n = len(points)
    radius = TUMOR_RADIUS_UM * px * rng.lognormal(0, 0.22, n)
    nucleolus = np.where(rng.uniform(size=n) < 0.75, rng.uniform(0.7, 1.0, n), 0.0)
    return _ellipses(rng, points, radius, rng.uniform(1.0, 2.0, n), wobble=rng.uniform(0.1, 0.25, n),
                     rim=rng.uniform(0.35, 0.6, n), nucleolus=nucleolus, opacity=rng.uniform(0.8, 0.95, n),
                     grain=0.18)


def lookalike_cells(rng: np.random.Generator, where: np.ndarray, mpp: float,
                    mimicry: float = 0.0) -> tuple[Nuclei, Nuclei]:
    """Round regular evenly stained nuclei on an even grid, and the pink halos around them.

    ``mimicry`` in [0, 1] moves the superficial cues toward tumor: nuclear colour, size, size spread, elongation,
    stain intensity and grid irregularity reach tumor's values at 1 and the halos fade out. Outline (smooth vs
    irregular) and chromatin (even vs vesicular with a nucleolus) never move: they stay the diagnostic cue, so a
    model can always learn the difference, but a frozen generic encoder finds it harder as ``mimicry`` grows.
    """
    m = float(np.clip(mimicry, 0.0, 1.0))
    px = 1.0 / mpp
    points = jittered_grid(rng, where.shape, spacing=_mix(11.0, 10.5, m) * px, jitter=_mix(0.1, 0.4, m))
    points = points[lookup(where, points) & (rng.uniform(size=len(points)) < 0.95)]
    n = len(points)
    radius = _mix(LOOKALIKE_RADIUS_UM, TUMOR_RADIUS_UM, m) * px * rng.lognormal(0, _mix(0.06, 0.22, m), n)
    nuclei = _ellipses(rng, points, radius, rng.uniform(1.0, _mix(1.08, 2.0, m), n), wobble=0.02, rim=0.0,
                       nucleolus=0.0, opacity=rng.uniform(_mix(0.68, 0.8, m), _mix(0.78, 0.95, m), n), grain=0.04)
    halos = _ellipses(rng, points, radius * 1.4, np.ones(n), wobble=0.0, rim=0.0, nucleolus=0.0,
                      opacity=0.75 * (1.0 - m), grain=0.0)
    return nuclei, halos


def lookalike_color(mimicry: float = 0.0) -> np.ndarray:
    """The look-alike nuclear colour, moved toward tumor's by ``mimicry`` (see :func:`lookalike_cells`)."""
    return _mix(LOOKALIKE_COLOR, TUMOR_COLOR, float(np.clip(mimicry, 0.0, 1.0))).astype(np.float32)


def _mix(start, end, weight: float):
    return start + (end - start) * weight
