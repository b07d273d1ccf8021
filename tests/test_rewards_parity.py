"""Adapters reproduce the official reward code: golden scores from benchmarks/rewards_parity_fixtures.py.

The fixtures hold tiny random-weight configs of the real architectures, six images (portrait, landscape, odd
crop margins, exact 224, very wide, upsampled) and six prompts (incl. an empty and an overlong one). The
expected scores were computed by hpsv2 1.2.0, transformers 4.27.3 (PickScore README code), torchmetrics 1.4.0,
open_clip and the OpenAI `clip` package + LAION `simple_inference.py`; see the generator's docstring.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prefalign.rewards import load
from prefalign.rewards.clip_common import write_clip_processor_files

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rewards"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
IMAGES = [FIXTURES / "images" / name for name in EXPECTED["images"]]
PROMPTS = EXPECTED["prompts"]
SCORES = EXPECTED["scores"]
OVERLONG = EXPECTED["overlong_prompt_index"]
TOL = 1e-4  # fp32 parity bound from the issue


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> Path:
    return write_clip_processor_files(tmp_path_factory.mktemp("clip_processor"))


def _open_clip_opts() -> dict:
    return {
        "checkpoint": FIXTURES / "openclip_tiny.safetensors",
        "model_config": FIXTURES / "openclip_tiny.json",
    }


@pytest.fixture(scope="module")
def models(processor_dir) -> dict:
    """Every adapter on its tiny fixture, loaded once for the module."""
    return {
        "hpsv2": load("hpsv2.1", **_open_clip_opts()),
        "hpsv2_no_antialias": load("hpsv2", antialias="false", **_open_clip_opts()),
        "clipscore_openclip": load("clipscore", backend="open_clip", **_open_clip_opts()),
        "aesthetic": load(
            "aesthetic",
            checkpoint=FIXTURES / "aesthetic_head.safetensors",
            clip_checkpoint=FIXTURES / "aesthetic_visual.safetensors",
            model_config=FIXTURES / "aesthetic_tiny.json",
        ),
        "pickscore": load("pickscore", checkpoint=FIXTURES / "hf_clip_tiny", processor=processor_dir),
        "clipscore_hf": load("clipscore", checkpoint=FIXTURES / "hf_clip_tiny", processor=processor_dir),
    }


def _score(model, images=IMAGES, prompts=PROMPTS, batch_size=16) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty/overlong prompt warnings are tested elsewhere
        return model.score(images, prompts, batch_size=batch_size)


@pytest.mark.parametrize(
    ("model_key", "expected_key"),
    [
        ("hpsv2", "hpsv2"),
        ("hpsv2_no_antialias", "hpsv2_no_antialias"),
        ("clipscore_openclip", "clipscore_openclip"),
        ("aesthetic", "aesthetic"),
        ("pickscore", "pickscore"),
        ("clipscore_hf", "clipscore_hf_truncated"),
    ],
)
def test_adapter_matches_official_code(models, model_key, expected_key):
    got = _score(models[model_key])
    expected = torch.tensor(SCORES[expected_key])
    assert torch.allclose(got, expected, atol=TOL, rtol=0), (got - expected).abs().max()
    assert expected.std() > 100 * TOL  # the fixture separates images well beyond the tolerance


def test_clipscore_matches_torchmetrics_except_its_truncation(models):
    """torchmetrics slices overlong prompts to 77 ids without an end token; the tokenizer keeps it."""
    got, expected = _score(models["clipscore_hf"]), torch.tensor(SCORES["clipscore_hf_torchmetrics"])
    keep = [i for i in range(len(IMAGES)) if i != OVERLONG]
    assert torch.allclose(got[keep], expected[keep], atol=TOL, rtol=0)
    assert abs(got[OVERLONG] - expected[OVERLONG]) > 1.0


def test_antialias_option_is_the_torchvision_difference():
    assert SCORES["hpsv2"] != SCORES["hpsv2_no_antialias"]


@pytest.mark.parametrize("model_key", ["hpsv2", "pickscore"])
def test_batching_does_not_change_scores(models, model_key):
    """Batched path (with prompt de-duplication) equals one-image-at-a-time scoring."""
    prompts = [PROMPTS[0]] * 3 + PROMPTS[3:]  # repeated prompts exercise the unique-prompt encoding
    together = _score(models[model_key], prompts=prompts, batch_size=16)
    one_by_one = torch.cat(
        [_score(models[model_key], [im], [p]) for im, p in zip(IMAGES, prompts, strict=True)]
    )
    assert torch.allclose(together, one_by_one, atol=1e-5, rtol=0)


# Differentiable vs no-grad: HPS's official preprocessing is already tensor ops, so the paths agree to float
# rounding. The centre-crop pipelines resize with PIL (8-bit intermediate rounding between its two separable
# passes) on the no-grad path and with torch's antialiased bicubic on the differentiable one: bounded here by
# 5e-4 in cosine units (0.05 on a x100 scale) and, for the amplified random aesthetic head, 2e-3 of the score.
DIFF_TOL = {"hpsv2": 1e-5, "clipscore_openclip": 5e-2, "pickscore": 5e-4 * 50.0, "aesthetic": 2e-3}


def _as_tensor_batch(size: tuple[int, int]) -> torch.Tensor:
    """Three fixture images resized to `size`, as k/255 floats (so the no-grad path's 8-bit input is
    exact)."""
    imgs = [Image.open(p).convert("RGB").resize(size, Image.BICUBIC) for p in IMAGES[:3]]
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs]).float() / 255


@pytest.mark.parametrize("model_key", sorted(DIFF_TOL))
@pytest.mark.parametrize("size", [(300, 200), (64, 48)])
def test_differentiable_path_agrees_and_has_gradients(models, model_key, size):
    model = models[model_key]
    x = _as_tensor_batch(size)
    prompts = ["a red circle", "two dogs playing in the snow", "a red circle"]
    reference = _score(model, list(x), prompts)
    pixels = x.clone().requires_grad_(True)
    scores = model.differentiable(pixels, prompts)
    assert torch.allclose(scores.detach(), reference, atol=DIFF_TOL[model_key], rtol=0)
    scores.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # gradients reach pixels, not the frozen reward


def test_bfloat16_tracks_float32(processor_dir):
    fp32 = _score(load("hpsv2.1", **_open_clip_opts()))
    bf16 = _score(load("hpsv2.1", dtype=torch.bfloat16, **_open_clip_opts()))
    assert bf16.dtype == torch.float32 and torch.allclose(bf16, fp32, atol=0.05, rtol=0)
