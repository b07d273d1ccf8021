"""The ground-truth preference oracle of the shapes world: pixels + prompt → score in [0, 1].

    oracle = 0.7 · fidelity + 0.3 · aesthetic

Everything is measured from pixels with fixed rules (no learned model); docs/shapes.md gives the full
definition. Detection: the background colour is the per-channel median of the 2-px border; each pixel is
explained as a mix `bg + α·(palette colour − bg)` and assigned to the palette colour with the smallest
residual (needs α ≥ 0.5 and residual < 0.3); same-colour pixels form 8-connected components; a component with
soft area ≥ 5 px is an object. Its shape: an upward triangle's mass centre sits below the middle of its
extent; otherwise the share of its (soft) bounding box it fills separates squares (≈ 1) from circles (≈ π/4).

Fidelity parts (each in [0, 1]): attributes (F1 of detected vs prompted (colour, shape) multisets), colour and
shape (F1 of each alone), count (1 − |Δ total|/prompted total), size (measured vs intended radius, only for
sized groups), relation (margin between the two groups along the relation axis, only with a relation),
background (distance of the border colour to the prompted one), shade (distance of object colours to the
palette). Aesthetic parts: sharpness (edge steepness relative to edge contrast), composition (centring of the
objects' bounding box, objects touching the border), clean (deviation and outliers of background pixels).

Images of another size are resized (bilinear, antialiased) to 32×32 first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefalign.errors import PrefalignError
from prefalign.shapes.grammar import BACKGROUNDS, COLOURS, DEFAULT_BACKGROUND, Scene, parse_prompt
from prefalign.shapes.render import SQUARE_HALF, TRIANGLE_HALF, layout

SIZE = 32
PALETTE_NAMES = tuple(COLOURS)
_PALETTE = torch.tensor([COLOURS[c] for c in PALETTE_NAMES], dtype=torch.float32)
ALPHA_MIN, RESIDUAL_MAX, MIN_AREA = 0.5, 0.3, 5.0
TRIANGLE_SKEW, SQUARE_FILL = 0.08, 0.89  # skew > 0.08 → triangle; else fill ≥ 0.89 → square; else circle
AREA_PER_R2 = {"circle": math.pi, "square": (2 * SQUARE_HALF) ** 2, "triangle": (2 * TRIANGLE_HALF) ** 2 / 2}
FIDELITY_WEIGHTS = {
    "attributes": 0.30,
    "colour": 0.10,
    "shape": 0.10,
    "count": 0.15,
    "size": 0.05,
    "relation": 0.15,
    "background": 0.05,
    "shade": 0.10,
}
AESTHETIC_WEIGHTS = {"sharpness": 0.4, "composition": 0.3, "clean": 0.3}
FIDELITY_SHARE = 0.7
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass(frozen=True)
class Detection:
    """One detected object: palette colour, shape class, radius and centre in canvas units."""

    colour: str
    shape: str
    r: float
    fill: float  # soft area / soft bounding-box area: square ≈ 1, circle ≈ π/4
    skew: float  # (mass centre − middle of extent) / height: upward triangle ≈ 1/6, others ≈ 0
    cx: float
    cy: float
    shade_error: float  # RGB distance of its core colour to the palette colour
    touches_border: bool
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in canvas units


def _prepare(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise PrefalignError(
            f"oracle: images must be a float tensor [B, 3, H, W]; got shape {tuple(images.shape)}"
        )
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[-2:] != (SIZE, SIZE):
        images = F.interpolate(
            images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return images


def estimate_background(images: torch.Tensor) -> torch.Tensor:
    """Per-channel median of the 2-pixel border ring: [B, 3]."""
    ring = torch.ones(images.shape[-2:], dtype=torch.bool)
    ring[2:-2, 2:-2] = False
    return images[:, :, ring].median(dim=-1).values


def _mixing(images: torch.Tensor, bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α [B, K, H, W] (clamped to [0, 1]) and squared residual of each pixel against each bg→palette line."""
    diff = images - bg[:, :, None, None]
    d = _PALETTE[None] - bg[:, None]  # [B, K, 3]
    dd = (d * d).sum(-1)[:, :, None, None]
    proj = torch.einsum("bchw,bkc->bkhw", diff, d)
    alpha = (proj / dd.clamp_min(1e-6)).clamp(0, 1)
    alpha = torch.where(
        dd > 0.05, alpha, torch.zeros_like(alpha)
    )  # palette colour ≈ background: undetectable
    n2 = diff.square().sum(1, keepdim=True)
    resid2 = (n2 - 2 * alpha * proj + alpha * alpha * dd).clamp_min(0)
    return alpha, resid2


def _neighbours(x: torch.Tensor, fill: int) -> list[torch.Tensor]:
    """The 8 neighbour views x[:, y + dy, x + dx] of [B, H, W], `fill` outside (one pad for all eight)."""
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    h, w = x.shape[-2:]
    return [padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _NEIGHBOURS]


def connected_components(colour_map: torch.Tensor) -> torch.Tensor:
    """8-connected components of equal non-negative values; label = 1 + flat index of the component's last
    pixel.

    Max-label propagation with pointer jumping, vectorised over the batch ([B, H, W] long → [B, H, W] long).
    """
    b, h, w = colour_map.shape
    # int16 (labels ≤ H·W ≤ 32767) quarters the memory traffic of int64 on CPU.
    if h * w >= 2**15:
        raise PrefalignError(
            f"connected_components: {h}x{w} images are too large; the oracle works at {SIZE}x{SIZE}"
        )
    colour_map = colour_map.to(torch.int16)
    valid = colour_map >= 0
    idx = torch.arange(1, h * w + 1, dtype=torch.int16).view(1, h, w).expand(b, h, w)
    labels = torch.where(valid, idx, torch.zeros_like(idx))
    same = [((n == colour_map) & valid).to(torch.int16) for n in _neighbours(colour_map, -1)]
    while True:
        new = labels
        for mask, shifted in zip(same, _neighbours(labels, 0), strict=True):
            new = torch.maximum(new, shifted * mask)
        flat = new.view(b, -1)
        jumped = torch.gather(flat, 1, (flat.long() - 1).clamp_min(0)).view(
            b, h, w
        )  # the label's pixel knows more
        new = torch.maximum(new, jumped * valid)
        if torch.equal(new, labels):
            return labels.long()
        labels = new


def _component_stats(images: torch.Tensor, bg: torch.Tensor) -> list[list[Detection]]:
    b, _, h, w = images.shape
    alpha, resid2 = _mixing(images, bg)
    # Pick the best-explaining colour first and threshold α after: a half-covered red edge pixel must not be
    # claimed by orange just because it lies past the middle of the bg→orange line.
    best, colour_map = torch.where(alpha > 0.1, resid2, torch.full_like(resid2, math.inf)).min(1)
    best_alpha = torch.gather(alpha, 1, colour_map.unsqueeze(1)).squeeze(1)
    colour_map = torch.where((best < RESIDUAL_MAX**2) & (best_alpha >= ALPHA_MIN), colour_map, -1)
    labels = connected_components(colour_map)
    # Grow each component by one pixel so antialiased / blurred edge pixels (α < 0.5) count softly.
    grown = _max_filter_1d(_max_filter_1d(labels, -1, 1), -2, 1)
    grown = torch.where(labels > 0, labels, grown)
    flat_colour = colour_map.view(b, -1)
    comp_colour = torch.gather(flat_colour, 1, (grown.view(b, -1) - 1).clamp_min(0)).view(b, h, w)
    member = grown > 0
    bi, yi, xi = member.nonzero(as_tuple=True)
    if bi.numel() == 0:
        return [[] for _ in range(b)]
    key = bi * (h * w + 1) + grown[bi, yi, xi]
    uniq, inv = torch.unique(key, return_inverse=True)
    n = uniq.numel()
    k = comp_colour[bi, yi, xi]
    a = alpha[bi, k, yi, xi]
    area = torch.zeros(n).index_add_(0, inv, a)
    cols = torch.zeros(n * w).scatter_reduce_(0, inv * w + xi, a, "amax").view(n, w)
    rows = torch.zeros(n * h).scatter_reduce_(0, inv * h + yi, a, "amax").view(n, h)
    sx = torch.zeros(n).index_add_(0, inv, a * (xi + 0.5))
    sy = torch.zeros(n).index_add_(0, inv, a * (yi + 0.5))
    core = (a - 0.75).clamp_min(0) + 1e-6  # shade is read from nearly pure pixels
    rgb = torch.zeros(n, 3).index_add_(0, inv, core[:, None] * images[bi, :, yi, xi])
    rgb = rgb / torch.zeros(n).index_add_(0, inv, core)[:, None]
    comp_b = torch.zeros(n, dtype=torch.long).scatter_(0, inv, bi)
    comp_k = torch.zeros(n, dtype=torch.long).scatter_(0, inv, k)
    shade_err = (rgb - _PALETTE[comp_k]).norm(dim=-1)
    width, height = cols.sum(1), rows.sum(1)
    fill = area / (width * height).clamp_min(1e-6)
    # Vertical skew: an upward triangle's mass centre lies h/6 below the middle of its extent; others ≈ 0.
    row_mid = (rows * (torch.arange(h) + 0.5)).sum(1) / height.clamp_min(1e-6)
    skew = (sy / area.clamp_min(1e-6) - row_mid) / height.clamp_min(1e-6)
    on_x, on_y = cols >= 0.5, rows >= 0.5
    x0 = on_x.float().argmax(1)
    x1 = w - 1 - on_x.flip(1).float().argmax(1)
    y0 = on_y.float().argmax(1)
    y1 = h - 1 - on_y.flip(1).float().argmax(1)
    touches = (x0 == 0) | (y0 == 0) | (x1 == w - 1) | (y1 == h - 1)
    detections: list[list[Detection]] = [[] for _ in range(b)]
    rows_np = torch.stack(
        [
            comp_b.float(),
            comp_k.float(),
            area,
            fill,
            sx / area.clamp_min(1e-6),
            sy / area.clamp_min(1e-6),
            shade_err,
            touches.float(),
            x0.float(),
            y0.float(),
            x1.float() + 1,
            y1.float() + 1,
            skew,
        ],
        1,
    ).numpy()
    for row in rows_np:
        if row[2] < MIN_AREA:
            continue
        shape = "triangle" if row[12] > TRIANGLE_SKEW else "square" if row[3] >= SQUARE_FILL else "circle"
        r = math.sqrt(row[2] / AREA_PER_R2[shape]) / w
        detections[int(row[0])].append(
            Detection(
                PALETTE_NAMES[int(row[1])],
                shape,
                r,
                float(row[3]),
                float(row[12]),
                row[4] / w,
                row[5] / h,
                float(row[6]),
                bool(row[7]),
                (row[8] / w, row[9] / h, row[10] / w, row[11] / h),
            )
        )
    return detections


def detect_objects(images: torch.Tensor) -> list[list[Detection]]:
    """The objects the oracle sees in each image ([B, 3, H, W] in [0, 1])."""
    images = _prepare(images)
    return _component_stats(images, estimate_background(images))


def _unit(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


def _f1(expected: list, detected: list) -> float:
    if not expected and not detected:
        return 1.0
    matched = sum(min(expected.count(v), detected.count(v)) for v in set(expected))
    return 2.0 * matched / (len(expected) + len(detected))


@functools.lru_cache(maxsize=65536)
def _intended_radius(scene: Scene) -> tuple[float, ...]:
    """Radius of each group as the ideal layout draws it (rows that would not fit are shrunk)."""
    radii = {p.group: p.r for p in layout(scene)}
    return tuple(radii[g] for g in range(len(scene.objects)))


def _relation_score(scene: Scene, dets: list[Detection]) -> float:
    first, second = ([d for d in dets if (d.colour, d.shape) == (s.colour, s.shape)] for s in scene.objects)
    if not first or not second:
        return 0.0
    axis = "cy" if scene.relation in ("above", "below") else "cx"
    lead, trail = (first, second) if scene.relation in ("left of", "above") else (second, first)
    margin = min(getattr(d, axis) for d in trail) - max(getattr(d, axis) for d in lead)
    return _unit(0.5 + margin / 0.1)  # ≥ 0.05 canvas units of clear separation → 1


def _fidelity_parts(scene: Scene, dets: list[Detection], background: float) -> dict[str, float]:
    expected = [(s.colour, s.shape) for s in scene.objects for _ in range(s.count)]
    detected = [(d.colour, d.shape) for d in dets]
    parts = {
        "attributes": _f1(expected, detected),
        "colour": _f1([c for c, _ in expected], [c for c, _ in detected]),
        "shape": _f1([s for _, s in expected], [s for _, s in detected]),
        "count": max(0.0, 1.0 - abs(len(dets) - len(expected)) / len(expected)),
    }
    parts["background"] = background
    parts["shade"] = sum(_unit(1.0 - d.shade_error / 0.3) for d in dets) / len(dets) if dets else 0.0
    radii = _intended_radius(scene)
    size_scores = []
    for spec, r_target in zip(scene.objects, radii, strict=True):
        if spec.size is None:
            continue
        found = [d.r for d in dets if (d.colour, d.shape) == (spec.colour, spec.shape)]
        size_scores.append(
            sum(_unit(1 - abs(r / r_target - 1) / 0.5) for r in found) / len(found) if found else 0
        )
    if size_scores:
        parts["size"] = sum(size_scores) / len(size_scores)
    if scene.relation is not None:
        parts["relation"] = _relation_score(scene, dets)
    return parts


def _max_filter_1d(x: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    """Running max over ±radius along `dim` (edges padded with the minimum); much cheaper than max_pool2d."""
    n = x.shape[dim]
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [radius, radius]
    padded = F.pad(x, pad, value=float(x.min()) if x.numel() else 0.0)
    out = padded.narrow(dim, 0, n)
    for k in range(1, 2 * radius + 1):
        out = torch.maximum(out, padded.narrow(dim, k, n))
    return out


def _sharpness(images: torch.Tensor) -> torch.Tensor:
    """Edge steepness: per direction, (largest 2-px colour step within ±1 px) / (4-px colour step), averaged
    over edges weighted by contrast, mapped to [0, 1].

    A sharp antialiased edge completes within 2 px (ratio 1); a Gaussian blur of sigma s spreads it (about
    0.75 at s = 1). Colour steps are RGB vector norms, so neighbouring objects of other colours do not count
    as contrast. No edges → 0.
    """
    num = images.new_zeros(images.shape[0])
    den = images.new_zeros(images.shape[0])
    for dim in (-1, -2):
        pad = (2, 2, 0, 0) if dim == -1 else (0, 0, 2, 2)
        x = F.pad(images, pad, mode="replicate")
        n = x.shape[dim]
        step2 = (
            (x.narrow(dim, 3, n - 4) - x.narrow(dim, 1, n - 4)).square().sum(1).sqrt()
        )  # |p[i+1] - p[i-1]|
        step4 = (
            (x.narrow(dim, 4, n - 4) - x.narrow(dim, 0, n - 4)).square().sum(1).sqrt()
        )  # |p[i+2] - p[i-2]|
        near = _max_filter_1d(step2, dim, radius=1)
        weight = (step4 - 0.2).clamp_min(0)
        num += (weight * (near / step4.clamp_min(1e-6)).clamp(max=1.0)).sum((1, 2))
        den += weight.sum((1, 2))
    sharp = ((num / den.clamp_min(1e-6) - 0.6) / 0.35).clamp(0, 1)
    return torch.where(den > 0, sharp, torch.zeros_like(sharp))


def _clean(images: torch.Tensor, bg: torch.Tensor, dets: list[list[Detection]]) -> torch.Tensor:
    """1 on a flat background; falls with the mean deviation and the share of outlier pixels (specks, stains).

    Background = everything outside each object's bounding box grown by 2 px (antialiasing / blur halo).
    """
    b, _, h, w = images.shape
    boxes = [(i, *d.bbox) for i, found in enumerate(dets) for d in found]
    keep = torch.ones(b, h, w)
    if boxes:
        box = torch.tensor(boxes)
        x0, y0 = box[:, 1:2] * w - 2, box[:, 2:3] * h - 2
        x1, y1 = box[:, 3:4] * w + 2, box[:, 4:5] * h + 2
        centre = torch.arange(w) + 0.5
        inside = ((centre > x0) & (centre < x1))[:, None, :] & ((centre > y0) & (centre < y1))[:, :, None]
        covered = torch.zeros(b, h, w).index_add_(0, box[:, 0].long(), inside.float())
        keep = (covered == 0).float()
    dev = (images - bg[:, :, None, None]).square().sum(1).sqrt()
    count = keep.sum((1, 2)).clamp_min(1)
    mean_dev = (dev * keep).sum((1, 2)) / count
    outliers = ((dev > 0.25).float() * keep).sum((1, 2)) / count
    return (1 - mean_dev / 0.1).clamp(0, 1) * (1 - outliers / 0.03).clamp(0, 1)


def _composition(dets: list[Detection]) -> float:
    """1 when the objects' joint bounding box is centred (±0.04 canvas units), 0 when ≥ 0.18 off; halved if
    every object touches the border."""
    if not dets:
        return 0.0
    x0, y0 = min(d.bbox[0] for d in dets), min(d.bbox[1] for d in dets)
    x1, y1 = max(d.bbox[2] for d in dets), max(d.bbox[3] for d in dets)
    off = math.hypot((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5)
    centred = _unit(1 - (off - 0.04) / 0.14)
    return centred * (1 - 0.5 * sum(d.touches_border for d in dets) / len(dets))


def _weighted(parts: dict[str, float], weights: dict[str, float]) -> float:
    present = [k for k in weights if k in parts]
    return sum(weights[k] * parts[k] for k in present) / sum(weights[k] for k in present)


def oracle_breakdown(
    images: torch.Tensor, prompts: Sequence[str], chunk: int = 512
) -> dict[str, torch.Tensor]:
    """All oracle parts for a batch: {part: Tensor[B]}; parts that do not apply to a prompt (size, relation)
    are NaN there. Also holds 'fidelity', 'aesthetic' and 'score'."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise PrefalignError(
            f"oracle: images must be a float tensor [B, 3, H, W]; got shape {tuple(images.shape)}"
        )
    if len(prompts) != images.shape[0]:
        raise PrefalignError(f"oracle: {images.shape[0]} images but {len(prompts)} prompts")
    scenes = [parse_prompt(p) for p in prompts]
    rows: list[dict[str, float]] = []
    for start in range(0, len(scenes), chunk):
        batch = _prepare(images[start : start + chunk])
        bg = estimate_background(batch)
        dets = _component_stats(batch, bg)
        sharp, clean = _sharpness(batch), _clean(batch, bg, dets)
        target = torch.tensor(
            [BACKGROUNDS[s.background or DEFAULT_BACKGROUND] for s in scenes[start : start + chunk]]
        )
        background = (1.0 - (bg - target).square().sum(1).sqrt() / 0.4).clamp(0, 1).tolist()
        for i, scene in enumerate(scenes[start : start + chunk]):
            parts = _fidelity_parts(scene, dets[i], background[i])
            parts.update(sharpness=float(sharp[i]), clean=float(clean[i]), composition=_composition(dets[i]))
            parts["fidelity"] = _weighted(parts, FIDELITY_WEIGHTS)
            parts["aesthetic"] = _weighted(parts, AESTHETIC_WEIGHTS)
            parts["score"] = FIDELITY_SHARE * parts["fidelity"] + (1 - FIDELITY_SHARE) * parts["aesthetic"]
            rows.append(parts)
    names = [*FIDELITY_WEIGHTS, *AESTHETIC_WEIGHTS, "fidelity", "aesthetic", "score"]
    return {k: torch.tensor([r.get(k, math.nan) for r in rows], dtype=torch.float32) for k in names}


def oracle(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Ground-truth preference score in [0, 1] of each (image, prompt): 0.7·fidelity + 0.3·aesthetic."""
    return oracle_breakdown(images, prompts)["score"]
