"""H&E-like pixels: smooth colour fields and nuclei stamped with vectorised numpy.

Nuclei are the cue that separates tumor, look-alike and normal tissue, so each nucleus carries its own shape
(ellipse axes, angle, boundary wobble) and chromatin (dark rim, nucleolus, grain). They are rendered all at once:
every nucleus gets a small local window, the opacity inside all windows is computed as one array, and the windows
are merged into the canvas with ``np.maximum.at``. No Python loop runs per nucleus or per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Stain colours (RGB) of an average H&E slide; sites shift them slightly.
WHITE = np.array([241.0, 240.0, 243.0], dtype=np.float32)
EOSIN = np.array([236.0, 168.0, 200.0], dtype=np.float32)
HEMATOXYLIN = np.array([58.0, 36.0, 108.0], dtype=np.float32)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-variance noise that varies over about ``scale_px`` pixels.

    Drawn on a coarse grid and upsampled, so a smooth field over a whole slide costs almost nothing.
    """
    height, width = shape
    step = max(1, int(scale_px / 3))
    coarse = rng.standard_normal((height // step + 3, width // step + 3))
    coarse = ndimage.gaussian_filter(coarse, sigma=1.5, mode="wrap")
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-8)
    if step == 1:
        return coarse[:height, :width].astype(np.float32)
    fine = ndimage.zoom(coarse.astype(np.float32), step, order=1, prefilter=False)
    return fine[:height, :width]


@dataclass
class Nuclei:
    """Per-nucleus shape and chromatin, all in pixels of the canvas they are stamped on."""

    xy: np.ndarray  # (N, 2) centres, x then y
    a: np.ndarray  # (N,) semi-axis along theta
    b: np.ndarray  # (N,) semi-axis across theta
    theta: np.ndarray  # (N,) orientation in radians
    wobble: np.ndarray  # (N,) boundary irregularity; 0 is a clean ellipse
    rim: np.ndarray  # (N,) how much paler the centre is than the rim (vesicular chromatin)
    nucleolus: np.ndarray  # (N,) darkness of one nucleolus
    opacity: np.ndarray  # (N,) peak stain of the nucleus
    grain: float = 0.1  # pixel-level chromatin granularity

    def __len__(self) -> int:
        return int(len(self.xy))

    def subset(self, keep: np.ndarray) -> Nuclei:
        fields = {name: getattr(self, name)[keep] for name in
                  ("xy", "a", "b", "theta", "wobble", "rim", "nucleolus", "opacity")}
        return Nuclei(**fields, grain=self.grain)


def stamp(shape: tuple[int, int], nuclei: Nuclei, rng: np.random.Generator,
          canvas: np.ndarray | None = None, chunk_pixels: int = 500_000) -> np.ndarray:
    """Opacity map (H, W) in [0, 1] of ``nuclei``; overlapping nuclei keep the darker value."""
    height, width = shape
    if canvas is None:
        canvas = np.zeros(shape, dtype=np.float32)
    flat = canvas.reshape(-1)
    # Grouped by window size, so small nuclei never pay for the window of the largest one.
    radii = np.ceil(np.maximum(nuclei.a, nuclei.b) * (1.0 + nuclei.wobble) + 1.5).astype(np.int64)
    for radius in np.unique(radii):
        members = np.flatnonzero(radii == radius)
        oy, ox = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float32)
        per_chunk = max(1, chunk_pixels // oy.size)
        for start in range(0, len(members), per_chunk):
            values, rows, cols = _windows(nuclei.subset(members[start:start + per_chunk]), ox, oy, rng)
            inside = (values > 0.01) & (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
            np.maximum.at(flat, rows[inside] * width + cols[inside], values[inside])
    return canvas


def _windows(n: Nuclei, ox: np.ndarray, oy: np.ndarray, rng: np.random.Generator):
    """Opacity of every nucleus over its local window, plus the canvas rows/cols of each window pixel."""
    col0 = np.rint(n.xy[:, 0]).astype(np.int64)
    row0 = np.rint(n.xy[:, 1]).astype(np.int64)
    dx = ox[None] - (n.xy[:, 0] - col0).astype(np.float32)[:, None, None]
    dy = oy[None] - (n.xy[:, 1] - row0).astype(np.float32)[:, None, None]
    cos, sin = np.cos(n.theta)[:, None, None], np.sin(n.theta)[:, None, None]
    a, b = n.a[:, None, None], n.b[:, None, None]
    u = (dx * cos + dy * sin) / a
    v = (-dx * sin + dy * cos) / b
    d = np.sqrt(u * u + v * v)
    if n.wobble.any():  # the angular terms are the costly part; round nuclei skip them
        phi = np.arctan2(v, u)
        phase = rng.uniform(0, 2 * np.pi, size=(len(n), 2, 1, 1)).astype(np.float32)
        wobble = n.wobble[:, None, None]
        d /= 1.0 + wobble * (0.6 * np.sin(3 * phi + phase[:, 0]) + 0.4 * np.sin(5 * phi + phase[:, 1]))
    mean_axis = 0.5 * (a + b)
    edge = np.clip((1.0 - d) * mean_axis / 1.2 + 0.5, 0.0, 1.0)  # about a 1.2 px soft edge
    values = edge * n.opacity[:, None, None]
    if n.rim.any():
        rim_shape = np.clip((d - 0.45) / 0.45, 0.0, 1.0)
        chromatin = 1.0 - n.rim[:, None, None] * (1.0 - rim_shape)
        if n.nucleolus.any():
            nx = 0.25 * a * rng.uniform(-1, 1, size=(len(n), 1, 1)).astype(np.float32)
            ny = 0.25 * b * rng.uniform(-1, 1, size=(len(n), 1, 1)).astype(np.float32)
            spot = np.exp(-((dx - nx) ** 2 + (dy - ny) ** 2) / (2 * (0.16 * mean_axis + 0.6) ** 2))
            chromatin = np.maximum(chromatin, n.nucleolus[:, None, None] * spot)
        values *= chromatin
    if n.grain > 0:
        values *= np.clip(1.0 + n.grain * rng.standard_normal(values.shape, dtype=np.float32), 0.0, None)
    values = np.minimum(values, 1.0)
    rows = row0[:, None, None] + oy.astype(np.int64)[None]
    cols = col0[:, None, None] + ox.astype(np.int64)[None]
    return values.astype(np.float32).ravel(), rows.ravel(), cols.ravel()


def paint(image: np.ndarray, opacity: np.ndarray, color: np.ndarray | float) -> None:
    """Blend ``color`` into ``image`` (H, W, 3 float32) in place, weighted by ``opacity`` (H, W)."""
    window = nonzero_box(opacity)
    if window is None:
        return
    image, opacity = image[window], opacity[window]
    color = np.broadcast_to(np.asarray(color, dtype=np.float32), (3,))
    for channel in range(3):
        plane = image[..., channel]
        plane += opacity * (color[channel] - plane)


def nonzero_box(array: np.ndarray) -> tuple[slice, slice] | None:
    """The smallest (rows, cols) window holding every non-zero value; None when all are zero."""
    rows = np.flatnonzero(array.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(array[rows[0]:rows[-1] + 1].any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def jittered_grid(rng: np.random.Generator, shape: tuple[int, int], spacing: float, jitter: float) -> np.ndarray:
    """Points on a hexagonal grid of ``spacing`` px, each moved by up to ``jitter`` x spacing; (N, 2) x, y."""
    height, width = shape
    row_step = spacing * np.sqrt(3) / 2
    ys = np.arange(row_step / 2, height, row_step)
    xs = np.arange(spacing / 2, width + spacing, spacing)
    gx, gy = np.meshgrid(xs, ys)
    gx = gx + (np.arange(len(ys)) % 2)[:, None] * spacing / 2
    points = np.stack([gx.ravel(), gy.ravel()], axis=1)
    points += rng.uniform(-jitter, jitter, size=points.shape) * spacing
    keep = (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)
    return points[keep]


def smooth_at(rng: np.random.Generator, shape: tuple[int, int], scale_px: float, xy: np.ndarray) -> np.ndarray:
    """:func:`smooth_field` evaluated only at the points ``xy``: no full-size array for a per-cell property."""
    step = max(1, int(scale_px / 3))
    coarse = rng.standard_normal((shape[0] // step + 3, shape[1] // step + 3))
    coarse = ndimage.gaussian_filter(coarse, sigma=1.5, mode="wrap")
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-8)
    return ndimage.map_coordinates(coarse, [xy[:, 1] / step, xy[:, 0] / step], order=1, prefilter=False)


def lookup(mask: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Values of ``mask`` at the (rounded, clipped) points ``xy``."""
    cols = np.clip(np.rint(xy[:, 0]).astype(np.int64), 0, mask.shape[1] - 1)
    rows = np.clip(np.rint(xy[:, 1]).astype(np.int64), 0, mask.shape[0] - 1)
    return mask[rows, cols]
