"""The renderer: shapes, colours and layout come out where the scene says; defects do what they claim."""

from __future__ import annotations

import numpy as np
import torch

from prefalign.shapes.grammar import BACKGROUNDS, COLOURS, ObjectSpec, Scene, parse_prompt, sample_scene
from prefalign.shapes.render import RenderQuality, gaussian_blur, layout, render, render_batch


def _pixel(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    size = image.shape[-1]
    return image[:, int(y * size), int(x * size)]


def _mean_red_column(image: torch.Tensor) -> float:
    return float(((image[1] < 0.5).sum(0) > 0).nonzero().float().mean())


def test_ideal_render_places_colours_and_background() -> None:
    scene = parse_prompt("two small red circles left of a large blue square on a black background")
    image = render(scene)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert torch.allclose(image[:, 0, 0], torch.tensor(BACKGROUNDS["black"]))
    placements = layout(scene)
    assert [p.colour for p in placements] == ["red", "red", "blue"]
    assert placements[0].cx < placements[1].cx < placements[2].cx  # "left of" holds by construction
    for p in placements:
        assert torch.allclose(_pixel(image, p.cx, p.cy), torch.tensor(COLOURS[p.colour]), atol=1e-6)


def test_relations_and_sizes_in_layout() -> None:
    below = layout(parse_prompt("a green triangle below a small yellow square"))
    assert below[0].colour == "yellow" and below[0].cy < below[1].cy
    sized = layout(parse_prompt("a small red circle right of a large blue circle"))
    assert sized[0].colour == "blue" and sized[0].r > sized[1].r


def test_render_is_deterministic_per_seed() -> None:
    scene = sample_scene(np.random.default_rng(1))
    quality = RenderQuality(blur=0.8, specks=4, noise=0.03, shade=0.1, dirt=0.2, offset=(0.1, 0.0))
    a = render(scene, rng=np.random.default_rng(5), quality=quality)
    b = render(scene, rng=np.random.default_rng(5), quality=quality)
    c = render(scene, rng=np.random.default_rng(6), quality=quality)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(render(scene), render(scene))


def test_edges_are_antialiased() -> None:
    red = render(Scene((ObjectSpec("circle", "blue", "large"),)))[0]  # red channel: 1.0 outside, 0.15 inside
    partial = ((red > 0.2) & (red < 0.95)).sum()
    assert partial > 8  # edge pixels take intermediate values


def test_defects_change_the_image_as_described() -> None:
    scene = parse_prompt("a large red square on a white background")
    ideal = render(scene)
    blurred = render(scene, quality=RenderQuality(blur=1.0))
    assert torch.allclose(blurred.mean(), ideal.mean(), atol=0.01)  # blur keeps the mass, softens edges
    assert (blurred[1] - ideal[1]).abs().max() > 0.2  # green channel: 1.0 outside, 0.1 inside
    shifted = render(scene, quality=RenderQuality(offset=(0.2, 0.0)))
    assert _mean_red_column(shifted) > _mean_red_column(ideal) + 4
    dirty = render(scene, rng=np.random.default_rng(0), quality=RenderQuality(dirt=0.4))
    assert (dirty[:, :4, :] - ideal[:, :4, :]).abs().max() > 0.05


def test_render_batch_matches_single_renders() -> None:
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(4)]
    batch = render_batch(scenes, size=16)
    assert batch.shape == (4, 3, 16, 16)
    assert torch.equal(batch[2], render(scenes[2], size=16))


def test_gaussian_blur_preserves_constant_images() -> None:
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat)
