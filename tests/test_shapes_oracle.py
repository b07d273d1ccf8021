"""The ground-truth oracle: ideal renders score near the top, every defect lowers the score, it is
deterministic, batched and bounded, and it reads counts / colours / shapes / relations from pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.shapes.grammar import parse_prompt, sample_scene, scene_to_prompt
from prefalign.shapes.oracle import detect_objects, oracle, oracle_breakdown
from prefalign.shapes.render import RenderQuality, render
from prefalign.shapes.webdata import SCENE_DEFECTS, corrupt_scene

N = 80


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(123)
    return [sample_scene(rng) for _ in range(N)]


@pytest.fixture(scope="module")
def ideal(scenes):
    images = torch.stack([render(s, rng=np.random.default_rng(i)) for i, s in enumerate(scenes)])
    prompts = [scene_to_prompt(s) for s in scenes]
    return images, prompts, oracle_breakdown(images, prompts)


def test_ideal_renders_score_near_the_top(ideal) -> None:
    _, _, parts = ideal
    assert float(parts["score"].mean()) > 0.97 and float(parts["score"].min()) > 0.9
    assert float(parts["attributes"].mean()) > 0.98 and float(parts["count"].mean()) > 0.98
    for name, values in parts.items():
        finite = values[~values.isnan()]
        assert float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0, name


@pytest.mark.parametrize(
    "quality",
    [
        RenderQuality(blur=1.0),
        RenderQuality(offset=(0.0, 0.2)),
        RenderQuality(specks=5),
        RenderQuality(noise=0.05),
        RenderQuality(shade=0.18),
        RenderQuality(dirt=0.3),
    ],
    ids=["blur", "off_centre", "clutter", "noise", "shade", "dirty_background"],
)
def test_each_image_defect_lowers_the_score(scenes, ideal, quality: RenderQuality) -> None:
    _, prompts, parts = ideal
    images = torch.stack(
        [render(s, rng=np.random.default_rng(i), quality=quality) for i, s in enumerate(scenes)]
    )
    drop = parts["score"] - oracle(images, prompts)
    assert float(drop.mean()) > 0.01
    assert float((drop > 0).float().mean()) > 0.9


@pytest.mark.parametrize("defect", SCENE_DEFECTS)
def test_each_scene_defect_lowers_fidelity(scenes, ideal, defect: str) -> None:
    _, prompts, parts = ideal
    keep, images = [], []
    for i, scene in enumerate(scenes):
        drawn = corrupt_scene(scene, defect, np.random.default_rng(1000 + i))
        if drawn is not None:
            keep.append(i)
            images.append(render(drawn, rng=np.random.default_rng(i)))
    bad = oracle_breakdown(torch.stack(images), [prompts[i] for i in keep])
    drop = parts["fidelity"][keep] - bad["fidelity"]
    assert float(drop.mean()) > 0.02
    assert float((drop > 0).float().mean()) > 0.9
    assert float((parts["score"][keep] - bad["score"]).mean()) > 0.02


def test_wrong_count_and_colour_hit_their_parts() -> None:
    prompt = "two red circles on a white background"
    good = render(parse_prompt(prompt))
    three = render(parse_prompt("three red circles on a white background"))
    green = render(parse_prompt("two green circles on a white background"))
    parts = oracle_breakdown(torch.stack([good, three, green]), [prompt] * 3)
    assert parts["count"][0] == 1.0 and parts["count"][1] < 1.0 and parts["count"][2] == 1.0
    assert parts["colour"][0] == 1.0 and parts["colour"][2] < 0.5
    assert parts["fidelity"][0] > parts["fidelity"][1] and parts["fidelity"][0] > parts["fidelity"][2]


def test_detection_reads_the_scene() -> None:
    image = render(
        parse_prompt("a small yellow triangle above two large purple squares on a gray background")
    )
    found = detect_objects(image[None])[0]
    assert sorted((d.colour, d.shape) for d in found) == [("purple", "square")] * 2 + [("yellow", "triangle")]
    triangle = next(d for d in found if d.shape == "triangle")
    assert all(triangle.cy < d.cy for d in found if d is not triangle)


def test_deterministic_batched_and_chunk_invariant(ideal) -> None:
    images, prompts, parts = ideal
    again = oracle_breakdown(images, prompts, chunk=7)
    for name in parts:
        assert torch.allclose(parts[name], again[name], equal_nan=True), name
    single = torch.cat([oracle(images[i : i + 1], prompts[i : i + 1]) for i in range(5)])
    assert torch.allclose(single, parts["score"][:5])


def test_other_sizes_and_degenerate_images() -> None:
    prompt = "a large green circle on a white background"
    big = render(parse_prompt(prompt), size=64)
    blank = torch.ones(3, 32, 32)
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = oracle(
        torch.stack([torch.nn.functional.interpolate(big[None], size=32, mode="area")[0], blank, noise]),
        [prompt] * 3,
    )
    assert float(oracle(big[None], [prompt])) > 0.9
    assert float(scores[1]) < 0.4 and float(scores[2]) < 0.4
    assert ((scores >= 0) & (scores <= 1)).all()


def test_user_errors() -> None:
    with pytest.raises(PrefalignError, match="2 images but 1 prompts"):
        oracle(torch.zeros(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(PrefalignError, match="'hexagon'"):
        oracle(torch.zeros(1, 3, 32, 32), ["a red hexagon"])
    with pytest.raises(PrefalignError, match=r"\[B, 3, H, W\]"):
        oracle(torch.zeros(3, 32, 32), ["a red circle"])
