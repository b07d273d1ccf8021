"""Procedural renderer: `Scene` → RGB image tensor [3, H, W] in [0, 1].

Shapes are drawn analytically on a 4× supersampled grid and box-filtered down, so edges are antialiased
and a sharp render is distinguishable from a blurred one. `RenderQuality` adds the image-level defects the
web-data distribution uses (blur, off-centre composition, clutter specks, pixel noise, wrong shade, dirty
background); `quality=None` is the ideal render. All randomness comes from the `numpy.random.Generator` passed in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prefalign.shapes.grammar import COLOURS, Scene

RADIUS = {"small": 0.085, None: 0.115, "large": 0.15}  # object radius in canvas units (canvas = [0, 1]²)
SQUARE_HALF = math.sqrt(math.pi) / 2  # half side / radius: a square has the area of the circle of that radius
TRIANGLE_HALF = 1.05  # half base = half height / radius (upward isosceles triangle)
GAP = 0.06  # space between neighbouring objects, canvas units
MAX_EXTENT = 0.9  # a row of objects longer than this is shrunk to fit
SUPERSAMPLE = 4
_COLOUR_TENSORS = {
    name: torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) for name, rgb in COLOURS.items()
}


@dataclass(frozen=True)
class Placement:
    """One object on the canvas: centre (cx, cy) and radius r in canvas units, y pointing down."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float
    group: int


@dataclass(frozen=True)
class RenderQuality:
    """Image-level defects; every field at its default is the ideal render.

    blur: Gaussian sigma in output pixels. offset: composition shift (dx, dy) in canvas units. specks: number
    of 1–2 px clutter specks. noise: std of Gaussian pixel noise. shade: L2 size of a random RGB shift of each
    object's colour. dirt: peak opacity of two soft coloured stains on the background.
    """

    blur: float = 0.0
    offset: tuple[float, float] = (0.0, 0.0)
    specks: int = 0
    noise: float = 0.0
    shade: float = 0.0
    dirt: float = 0.0


def _half_extent(shape: str, r: float) -> float:
    return {"circle": r, "square": SQUARE_HALF * r, "triangle": TRIANGLE_HALF * r}[shape]


def layout(scene: Scene, rng: np.random.Generator | None = None, offset: tuple[float, float] = (0.0, 0.0)):
    """Place the scene's objects in a row (or column for above/below), centred; returns list[Placement].

    Group 0 comes first along the axis for "left of"/"above" and second for "right of"/"below", so the
    relation holds by construction. With `rng`, adds a small global and per-object jitter that keeps it.
    """
    groups = list(enumerate(scene.objects))
    if scene.relation in ("right of", "below"):
        groups.reverse()
    vertical = scene.relation in ("above", "below")
    items = [(g, spec) for g, spec in groups for _ in range(spec.count)]
    extent = sum(2 * RADIUS[spec.size] for _, spec in items) + GAP * (len(items) - 1)
    scale = min(1.0, MAX_EXTENT / extent)
    gap = GAP * scale
    pos = 0.5 - extent * scale / 2
    shift = np.zeros(2) if rng is None else rng.uniform(-0.03, 0.03, size=2)
    placements = []
    for g, spec in items:
        r = RADIUS[spec.size] * scale
        along, across = pos + r, 0.5
        if rng is not None:
            along += rng.uniform(-0.25, 0.25) * gap
            across += rng.uniform(-0.04, 0.04)
        pos += 2 * r + gap
        x, y = (across, along) if vertical else (along, across)
        placements.append(Placement(spec.shape, spec.colour, x + shift[0], y + shift[1], r, g))
    return _apply_offset(placements, offset)


def _apply_offset(placements: list[Placement], offset: tuple[float, float]) -> list[Placement]:
    """Shift the whole composition by `offset`, clipped so that no object leaves the canvas."""
    if offset == (0.0, 0.0):
        return placements
    x0 = min(p.cx - _half_extent(p.shape, p.r) for p in placements)
    x1 = max(p.cx + _half_extent(p.shape, p.r) for p in placements)
    y0 = min(p.cy - _half_extent(p.shape, p.r) for p in placements)
    y1 = max(p.cy + _half_extent(p.shape, p.r) for p in placements)
    dx = min(max(offset[0], -x0), 1.0 - x1)
    dy = min(max(offset[1], -y0), 1.0 - y1)
    return [Placement(p.shape, p.colour, p.cx + dx, p.cy + dy, p.r, p.group) for p in placements]


def shape_mask(
    shape: str, cx: float, cy: float, r: float, xs: torch.Tensor, ys: torch.Tensor
) -> torch.Tensor:
    """Boolean mask of one shape on a sample grid (xs: [1, W], ys: [H, 1] canvas coordinates)."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        h = SQUARE_HALF * r
        return ((xs - cx).abs() <= h) & ((ys - cy).abs() <= h)
    h = TRIANGLE_HALF * r
    top = cy - h
    inside_rows = (ys >= top) & (ys <= cy + h)
    return inside_rows & ((xs - cx).abs() <= (ys - top) / 2)  # half-width grows from 0 to h over height 2h


@functools.lru_cache(maxsize=8)
def _grid(n: int) -> torch.Tensor:
    """Sample positions (pixel centres) along one axis in canvas units; cached, never written to."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [..., C, H, W] with replicate padding (sigma in pixels)."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    shape = images.shape
    x = images.reshape(-1, 1, shape[-2], shape[-1])
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.reshape(shape)


def _background(scene: Scene, n: int, quality: RenderQuality, rng: np.random.Generator) -> torch.Tensor:
    bg = torch.tensor(scene.background_rgb, dtype=torch.float32).view(3, 1, 1).expand(3, n, n).clone()
    if quality.dirt > 0:
        xs, ys = _grid(n).view(1, -1), _grid(n).view(-1, 1)
        for _ in range(2):
            cx, cy = rng.uniform(0.1, 0.9, size=2)
            rho = rng.uniform(0.15, 0.35)
            stain = torch.tensor(rng.uniform(0, 1, size=3), dtype=torch.float32).view(3, 1, 1)
            alpha = quality.dirt * torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * rho * rho))
            bg = bg + alpha * (stain - bg)
    return bg


def render(
    scene: Scene,
    size: int = 32,
    rng: np.random.Generator | None = None,
    quality: RenderQuality | None = None,
) -> torch.Tensor:
    """Render `scene` to a float tensor [3, size, size] in [0, 1].

    `rng=None` gives the exactly centred layout; with an rng the layout is jittered (relations preserved).
    Stochastic defects in `quality` draw from `rng` (a fixed `default_rng(0)` when rng is None).
    """
    quality = quality or RenderQuality()
    draw_rng = rng if rng is not None else np.random.default_rng(0)
    n = size * SUPERSAMPLE
    xs, ys = _grid(n).view(1, -1), _grid(n).view(-1, 1)
    canvas = _background(scene, n, quality, draw_rng)
    for p in layout(scene, rng, quality.offset):
        colour = _COLOUR_TENSORS[p.colour]
        if quality.shade > 0:
            direction = draw_rng.normal(size=3)
            shift = torch.tensor(quality.shade * direction / np.linalg.norm(direction), dtype=torch.float32)
            colour = (colour + shift.view(3, 1, 1)).clamp(0.0, 1.0)
        # Only the object's bounding box is rasterised: ~10x fewer samples than the full canvas.
        h = _half_extent(p.shape, p.r)
        x0, x1 = max(0, int((p.cx - h) * n) - 1), min(n, int((p.cx + h) * n) + 2)
        y0, y1 = max(0, int((p.cy - h) * n) - 1), min(n, int((p.cy + h) * n) + 2)
        mask = shape_mask(p.shape, p.cx, p.cy, p.r, xs[:, x0:x1], ys[y0:y1])
        window = canvas[:, y0:y1, x0:x1]
        canvas[:, y0:y1, x0:x1] = torch.where(mask, colour, window)
    image = F.avg_pool2d(canvas.unsqueeze(0), SUPERSAMPLE).squeeze(0)
    image = gaussian_blur(image, quality.blur)
    for _ in range(quality.specks):
        y, x = draw_rng.integers(0, size, size=2)
        speck = torch.tensor(draw_rng.uniform(0, 1, size=3), dtype=torch.float32)
        image[:, y, x] = speck
        if draw_rng.random() < 0.5:  # half the specks are two pixels wide
            image[:, y, min(x + 1, size - 1)] = speck
    if quality.noise > 0:
        noise = draw_rng.normal(0.0, quality.noise, size=(3, size, size))
        image = image + torch.tensor(noise, dtype=torch.float32)
    return image.clamp(0.0, 1.0)


def render_batch(
    scenes: Sequence[Scene],
    size: int = 32,
    rng: np.random.Generator | None = None,
    qualities: Sequence[RenderQuality | None] | None = None,
) -> torch.Tensor:
    """Render many scenes into [B, 3, size, size]; one shared rng is consumed in order."""
    qualities = qualities if qualities is not None else [None] * len(scenes)
    if len(qualities) != len(scenes):
        raise ValueError(f"render_batch: {len(scenes)} scenes but {len(qualities)} qualities")
    if not scenes:
        return torch.zeros(0, 3, size, size)
    return torch.stack([render(s, size, rng, q) for s, q in zip(scenes, qualities, strict=True)])
