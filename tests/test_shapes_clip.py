"""shapes-clip (model, training, shipped checkpoint) and the shapes-oracle / shapes-clip reward entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prefalign.shapes  # noqa: F401  (registers the shapes rewards)
from prefalign.errors import PrefalignError
from prefalign.rewards import available, load
from prefalign.shapes.clip import (
    DEFAULT_CHECKPOINT,
    ShapesCLIPConfig,
    WordTokenizer,
    evaluate_shapes_clip,
    load_shapes_clip,
    train_shapes_clip,
)
from prefalign.shapes.grammar import parse_prompt
from prefalign.shapes.oracle import oracle
from prefalign.shapes.render import RenderQuality, render

TINY = ShapesCLIPConfig(embed_dim=16, channels=(8, 8, 16, 16), text_width=16, text_layers=1, text_heads=2)


def test_tokenizer_maps_grammar_words_and_marks_unknowns() -> None:
    tok = WordTokenizer(context_length=8)
    ids = tok(["two small red circles", "a mauve blob"])
    assert ids.shape == (2, 8)
    assert ids[0, :6].tolist() == [
        1,
        tok.index["two"],
        tok.index["small"],
        tok.index["red"],
        tok.index["circles"],
        2,
    ]
    assert ids[1, 2].item() == tok.index["<unk>"] == ids[1, 3].item()


def test_training_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    a, summary = train_shapes_clip(steps=3, seed=0, batch_size=8, n_pairs=8, config=TINY, out_dir=tmp_path)
    b, _ = train_shapes_clip(steps=3, seed=0, batch_size=8, n_pairs=8, config=TINY)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert np.isfinite(summary["final_loss"])
    loaded = load_shapes_clip(tmp_path)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "two blue squares"]
    assert torch.allclose(loaded(images, prompts), a(images, prompts), atol=2e-2)  # stored as float16


def test_missing_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(PrefalignError, match=r"python -m prefalign\.shapes\.clip"):
        load_shapes_clip(tmp_path)


def test_shipped_checkpoint_is_small_and_aligned() -> None:
    weights = DEFAULT_CHECKPOINT / "model.safetensors"
    assert weights.stat().st_size < 2_000_000
    model = load_shapes_clip()
    metrics = evaluate_shapes_clip(model, n_prompts=60, group=3)  # chance: retrieval 1/60, twins 0.5, rho 0
    assert metrics["retrieval_i2t"] > 0.8 and metrics["twin_accuracy"] > 0.7
    assert metrics["spearman_oracle"] > 0.2


def test_reward_entries_score_and_differentiate() -> None:
    assert {"shapes-oracle", "shapes-clip"} <= set(available())
    prompt = "two small red circles left of a blue square on a white background"
    scene = parse_prompt(prompt)
    images = torch.stack([render(scene), render(scene, quality=RenderQuality(blur=1.5, noise=0.08))])
    truth = load("shapes-oracle")
    assert torch.allclose(truth.score(images, [prompt] * 2), oracle(images, [prompt] * 2))
    pil = Image.fromarray((images[0] * 255).round().byte().permute(1, 2, 0).numpy())
    assert abs(float(truth.score([pil], [prompt])[0]) - float(truth.score(images[:1], [prompt])[0])) < 0.02
    assert load("shapes-oracle", part="aesthetic").score(images, [prompt] * 2)[1] < 0.9
    with pytest.raises(PrefalignError, match="no gradient"):
        truth.differentiable(images, [prompt] * 2)
    with pytest.raises(PrefalignError, match="no checkpoint"):
        load("shapes-oracle", checkpoint="x")

    clip = load("shapes-clip")
    assert clip.info.convention == "100 x max(cos, 0)" and clip.input_size == 32
    scores = clip.score(images, [prompt] * 2)
    assert scores.shape == (2,) and float(scores.min()) >= 0.0
    pixels = images.clone().requires_grad_(True)
    clip.differentiable(pixels, [prompt] * 2).sum().backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0
    assert torch.allclose(
        clip.differentiable(images, [prompt] * 2), scores, atol=0.1
    )  # score rounds to 8 bits
    wrong = clip.score(images[:1], ["three green triangles on a black background"])
    assert float(scores[0]) > float(wrong[0])
