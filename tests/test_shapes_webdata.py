"""The web-data distribution: documented defect rates, unfaithful pairs where claimed, seeded, extendable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefalign.shapes.grammar import parse_prompt, sample_scene, scene_to_prompt
from prefalign.shapes.webdata import (
    SCENE_DEFECTS,
    WEB_RATES,
    WebDataset,
    corrupt_scene,
    make_web_dataset,
    sample_web_example,
    sample_web_pair,
)

ALWAYS_APPLICABLE = (
    "blur",
    "off_centre",
    "clutter",
    "noise",
    "wrong_shade",
    "dirty_background",
    "wrong_colour",
    "wrong_shape",
    "wrong_count",
    "wrong_background",
)


@pytest.fixture(scope="module")
def samples():
    return [sample_web_example(np.random.default_rng([11, i])) for i in range(500)]


@pytest.mark.parametrize("defect", ALWAYS_APPLICABLE)
def test_defect_rates_match_the_documented_rates(samples, defect: str) -> None:
    rate = np.mean([defect in s.defects for s in samples])
    p = WEB_RATES[defect]
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / len(samples)) + 0.005


def test_scene_defects_make_pairs_unfaithful_and_image_defects_do_not(samples) -> None:
    for s in samples:
        faithful = not set(s.defects) & set(SCENE_DEFECTS)
        assert (s.drawn == parse_prompt(s.prompt)) == faithful
    assert 0.6 < np.mean([not set(s.defects) & set(SCENE_DEFECTS) for s in samples]) < 0.9


@pytest.mark.parametrize("defect", SCENE_DEFECTS)
def test_each_scene_defect_changes_the_scene(defect: str) -> None:
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(50):
        scene = sample_scene(rng)
        out = corrupt_scene(scene, defect, rng)
        if out is not None:
            changed += 1
            assert scene_to_prompt(out) != scene_to_prompt(scene)
    assert changed >= 10


def test_web_dataset_is_seeded_and_prefix_stable() -> None:
    prompts, images = make_web_dataset(6, seed=3)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 32, 32)
    prompts_b, images_b = make_web_dataset(4, seed=3)
    assert prompts_b == prompts[:4] and torch.equal(images_b, images[:4])
    assert make_web_dataset(4, seed=4)[0] != prompts_b
    dataset = WebDataset(3, seed=3)
    prompt, image = dataset[1]
    assert prompt == prompts[1] and torch.allclose(image, images[1].float() / 255)


def test_sample_web_pair_returns_prompt_and_float_image() -> None:
    prompt, image = sample_web_pair(np.random.default_rng(0), size=16)
    parse_prompt(prompt)
    assert image.shape == (3, 16, 16) and float(image.min()) >= 0 and float(image.max()) <= 1
