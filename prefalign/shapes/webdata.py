"""The "web data" distribution: (prompt, image) pairs that are mostly, not always, faithful and clean.

Each example draws a scene with `sample_scene`, keeps its canonical prompt, and then independently applies
each defect below with its rate from `WEB_RATES`. Scene defects change what is drawn (the prompt stays the
original, so the pair becomes unfaithful); image defects degrade how it is drawn (`RenderQuality`). Measured
on 4,000 examples: 77% of pairs are faithful, 17% are faithful and clean, and the mean oracle score is 0.83
(ideal renders ≈ 0.99), so a model pretrained on them has room to improve.

| defect            | rate | what happens                                                              |
|-------------------|------|---------------------------------------------------------------------------|
| blur              | 0.30 | Gaussian blur, sigma ~ U(0.5, 1.5) px                                     |
| off_centre        | 0.25 | composition shifted by 0.12–0.25 canvas units in a random direction       |
| clutter           | 0.20 | 2–8 random-colour specks of 1–2 px                                        |
| noise             | 0.20 | Gaussian pixel noise, std ~ U(0.02, 0.08)                                 |
| wrong_shade       | 0.20 | each object's colour shifted by an RGB vector of length U(0.10, 0.22)     |
| dirty_background  | 0.15 | two soft coloured stains, peak opacity U(0.15, 0.40)                      |
| wrong_count       | 0.08 | one group gets one object more or fewer (possibly none)                   |
| wrong_colour      | 0.05 | one group drawn in another colour                                         |
| wrong_shape       | 0.05 | one group drawn as another shape                                          |
| wrong_relation    | 0.05 | the two groups swap sides (relation prompts only: 2.6% of all examples)   |
| wrong_size        | 0.04 | small ↔ large for one sized group (sized prompts only: 3% of all)         |
| wrong_background  | 0.03 | another background colour                                                 |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prefalign.shapes.grammar import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_BACKGROUND,
    MAX_OBJECTS,
    OPPOSITE_RELATION,
    SHAPES,
    ObjectSpec,
    Scene,
    sample_scene,
    scene_to_prompt,
)
from prefalign.shapes.render import RenderQuality, render

WEB_RATES: dict[str, float] = {
    "blur": 0.30,
    "off_centre": 0.25,
    "clutter": 0.20,
    "noise": 0.20,
    "wrong_shade": 0.20,
    "dirty_background": 0.15,
    "wrong_count": 0.08,
    "wrong_colour": 0.05,
    "wrong_shape": 0.05,
    "wrong_relation": 0.05,
    "wrong_size": 0.04,
    "wrong_background": 0.03,
}
SCENE_DEFECTS = (
    "wrong_count",
    "wrong_colour",
    "wrong_shape",
    "wrong_relation",
    "wrong_size",
    "wrong_background",
)


@dataclass(frozen=True)
class WebSample:
    """One web-data example: the prompt, the image, the scene actually drawn and the defects applied."""

    prompt: str
    image: torch.Tensor
    drawn: Scene
    defects: tuple[str, ...]


def _other(rng: np.random.Generator, options: Sequence[str], current: str | None) -> str:
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _with_group(scene: Scene, g: int, spec: ObjectSpec | None) -> Scene:
    """Replace group `g` (None removes it, leaving a one-group scene without relation)."""
    objects = list(scene.objects)
    if spec is None:
        del objects[g]
        return Scene(tuple(objects), None, scene.background)
    objects[g] = spec
    return dataclasses.replace(scene, objects=tuple(objects))


def corrupt_scene(scene: Scene, defect: str, rng: np.random.Generator) -> Scene | None:
    """Apply one scene defect; None when it does not apply (e.g. wrong_relation on a one-group scene)."""
    g = int(rng.integers(len(scene.objects)))
    spec = scene.objects[g]
    if defect == "wrong_count":
        others = scene.num_objects - spec.count
        options = [c for c in (spec.count - 1, spec.count + 1) if 1 <= others + c <= MAX_OBJECTS and c >= 0]
        if not options:
            return None
        count = options[int(rng.integers(len(options)))]
        return _with_group(scene, g, dataclasses.replace(spec, count=count) if count else None)
    if defect == "wrong_colour":
        return _with_group(
            scene, g, dataclasses.replace(spec, colour=_other(rng, tuple(COLOURS), spec.colour))
        )
    if defect == "wrong_shape":
        return _with_group(scene, g, dataclasses.replace(spec, shape=_other(rng, SHAPES, spec.shape)))
    if defect == "wrong_relation":
        if scene.relation is None:
            return None
        return dataclasses.replace(scene, relation=OPPOSITE_RELATION[scene.relation])
    if defect == "wrong_size":
        sized = [i for i, s in enumerate(scene.objects) if s.size is not None]
        if not sized:
            return None
        g = sized[int(rng.integers(len(sized)))]
        spec = scene.objects[g]
        return _with_group(
            scene, g, dataclasses.replace(spec, size="large" if spec.size == "small" else "small")
        )
    if defect == "wrong_background":
        current = scene.background or DEFAULT_BACKGROUND
        return dataclasses.replace(scene, background=_other(rng, tuple(BACKGROUNDS), current))
    raise ValueError(f"unknown scene defect {defect!r}")


def sample_quality(
    rng: np.random.Generator, rates: dict[str, float] | None = None
) -> tuple[RenderQuality, list[str]]:
    """Draw the image defects of one web example; returns the quality and the names of defects applied."""
    rates = WEB_RATES if rates is None else rates
    applied = [
        name
        for name in ("blur", "off_centre", "clutter", "noise", "wrong_shade", "dirty_background")
        if rng.random() < rates.get(name, 0.0)
    ]
    fields: dict = {}
    if "blur" in applied:
        fields["blur"] = float(rng.uniform(0.5, 1.5))
    if "off_centre" in applied:
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.12, 0.25)
        fields["offset"] = (float(dist * np.cos(angle)), float(dist * np.sin(angle)))
    if "clutter" in applied:
        fields["specks"] = int(rng.integers(2, 9))
    if "noise" in applied:
        fields["noise"] = float(rng.uniform(0.02, 0.08))
    if "wrong_shade" in applied:
        fields["shade"] = float(rng.uniform(0.10, 0.22))
    if "dirty_background" in applied:
        fields["dirt"] = float(rng.uniform(0.15, 0.40))
    return RenderQuality(**fields), applied


def sample_web_example(
    rng: np.random.Generator,
    size: int = 32,
    scene: Scene | None = None,
    rates: dict[str, float] | None = None,
) -> WebSample:
    """One web example (for `scene`, or a fresh `sample_scene`), with the defects it received."""
    rates = WEB_RATES if rates is None else rates
    scene = scene if scene is not None else sample_scene(rng)
    drawn, defects = scene, []
    for defect in SCENE_DEFECTS:
        if rng.random() < rates.get(defect, 0.0):
            changed = corrupt_scene(drawn, defect, rng)
            if changed is not None:
                drawn = changed
                defects.append(defect)
    quality, image_defects = sample_quality(rng, rates)
    image = render(drawn, size, rng, quality)
    return WebSample(scene_to_prompt(scene), image, drawn, tuple(defects + image_defects))


def sample_web_pair(rng: np.random.Generator, size: int = 32) -> tuple[str, torch.Tensor]:
    """A web-data (prompt, image [3, size, size] float in [0, 1]) pair."""
    sample = sample_web_example(rng, size)
    return sample.prompt, sample.image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] → uint8 (round to nearest)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def make_web_dataset(n: int, seed: int, size: int = 32) -> tuple[list[str], torch.Tensor]:
    """`n` web pairs: (prompts, uint8 images [n, 3, size, size]).

    Example i draws from `default_rng([seed, i])`, so a larger dataset extends a smaller one (same seed).
    """
    prompts: list[str] = []
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        prompt, image = sample_web_pair(np.random.default_rng([seed, i]), size)
        prompts.append(prompt)
        images[i] = to_uint8(image)
    return prompts, images


class WebDataset(torch.utils.data.Dataset):
    """Map-style dataset over `make_web_dataset(n, seed, size)`; items are (prompt, float image in [0, 1])."""

    def __init__(self, n: int, seed: int, size: int = 32) -> None:
        self.prompts, self.images = make_web_dataset(n, seed, size)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        return self.prompts[index], self.images[index].float() / 255.0
