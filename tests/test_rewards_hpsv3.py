"""HPSv3 adapter: parity with the official hpsv3 1.0.0 code, strict loading, the differentiable path.

fixtures/hpsv3 was written by benchmarks/hpsv3_parity_fixtures.py, which ran the official inference code
(transformers 4.45) on a tiny random Qwen2-VL reward model saved in the official layout (checkpoint/: the base
model's config + tokenizer files and HPSv3.safetensors); expected.json holds its tokens, pixel statistics and
rewards. The official code never runs here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file, save_file

from prefalign import rewards
from prefalign.errors import PrefalignError
from prefalign.rewards.hpsv3 import (
    INSTRUCTION,
    REWARD_SUFFIX,
    HPSv3Model,
    _official_pixels,
    chat_text,
    load_hpsv3,
    patchify,
    smart_resize,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hpsv3"
CHECKPOINT = FIXTURES / "checkpoint"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
PROMPTS: list[str] = EXPECTED["prompts"]
IMAGES = [FIXTURES / "images" / name for name in EXPECTED["images"]]
OFFICIAL = torch.tensor(EXPECTED["reward_batched"])  # [B, 2]: μ, log σ
PARITY_TOL = 1e-4


def _tensor(path: Path) -> torch.Tensor:
    return TF.to_tensor(Image.open(path).convert("RGB")).unsqueeze(0)


@pytest.fixture(scope="module")
def model() -> HPSv3Model:
    return load_hpsv3(CHECKPOINT)


def test_smart_resize_matches_official():
    for h, w, rh, rw in EXPECTED["smart_resize"]:
        assert smart_resize(h, w) == (rh, rw), (h, w)
    assert smart_resize(768, 768) == (420, 420)  # the float-floor case the reference notes call out


def test_chat_text_is_the_official_template():
    template = EXPECTED["chat_template_text"]  # the official processor's rendering of the text "TEXT"
    for prompt in PROMPTS:
        assert chat_text(prompt) == template.replace("TEXT", INSTRUCTION.format(text_prompt=prompt) + REWARD_SUFFIX)


def test_pixels_match_official_processor():
    for path, grid, stats in zip(IMAGES, EXPECTED["image_grid_thw"], EXPECTED["pixel_stats"], strict=True):
        pixels = _official_pixels(path)
        assert [1, pixels.shape[1] // 14, pixels.shape[2] // 14] == grid
        patches = patchify(pixels).double()
        assert patches.shape == (grid[1] * grid[2], 3 * 2 * 14 * 14)
        assert abs(patches.sum().item() - stats["sum"]) < 1e-3
        assert abs(patches.abs().sum().item() - stats["abs_sum"]) < 1e-3
        assert torch.allclose(patches[0, :8].float(), torch.tensor(stats["first"]), atol=1e-6)


def test_tokens_match_official(model):
    counts = [t * h * w // 4 for t, h, w in EXPECTED["image_grid_thw"]]
    ids, mask = model.encode(PROMPTS, counts)
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)] == EXPECTED["input_ids"]
    assert (ids == EXPECTED["reward_token_id"]).sum(1).tolist() == [1] * len(PROMPTS)
    assert (mask == 0).any()  # the prompts differ in length, so right padding is exercised


def test_score_matches_official(model):
    got = model.score([str(p) for p in IMAGES], PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (len(IMAGES),)
    assert torch.allclose(got, OFFICIAL[:, 0], atol=PARITY_TOL, rtol=0)
    # the scores differ between inputs far beyond the tolerance, so the comparison can fail
    assert (OFFICIAL[:, 0].max() - OFFICIAL[:, 0].min()) > 100 * PARITY_TOL


def test_forward_gives_official_mu_and_log_sigma(model):
    pixels = [_official_pixels(p) for p in IMAGES]
    assert torch.allclose(model._reward(pixels, PROMPTS), OFFICIAL, atol=PARITY_TOL, rtol=0)


def test_batch_invariance(model):
    one = model.score(IMAGES, PROMPTS, batch_size=1)
    assert torch.allclose(one, torch.tensor(EXPECTED["reward_single"])[:, 0], atol=PARITY_TOL, rtol=0)
    assert torch.allclose(model.score(IMAGES, PROMPTS, batch_size=3), one, atol=1e-5, rtol=0)
    order = [3, 1, 0, 2]
    shuffled = model.score([IMAGES[i] for i in order], [PROMPTS[i] for i in order])
    assert torch.allclose(shuffled, one[order], atol=1e-5, rtol=0)


def test_input_types_agree(model):
    rgb = Image.open(IMAGES[3]).convert("RGB")
    inputs = [IMAGES[3], rgb, np.asarray(rgb), _tensor(IMAGES[3])[0]]
    got = model.score(inputs, [PROMPTS[3]] * len(inputs))
    assert torch.allclose(got, torch.full_like(got, OFFICIAL[3, 0].item()), atol=PARITY_TOL, rtol=0)


def test_differentiable_equals_score(model):
    """Same pixels (448², which smart_resize keeps) -> same reward; with a resize, tensor bicubic vs PIL on
    uint8 moves the reward by little."""
    native = model.differentiable(_tensor(IMAGES[0]), PROMPTS[:1])
    assert abs(native.item() - OFFICIAL[0, 0].item()) <= PARITY_TOL
    for i in (1, 2, 3):
        resized = model.differentiable(_tensor(IMAGES[i]), PROMPTS[i : i + 1])
        assert abs(resized.item() - OFFICIAL[i, 0].item()) <= 1e-3, IMAGES[i].name  # measured ≤ 2.1e-4
    batch = torch.cat([_tensor(IMAGES[0]), _tensor(IMAGES[0]).flip(-1)])
    both = model.differentiable(batch, PROMPTS[:2])
    assert torch.allclose(both, model.score(list(batch), PROMPTS[:2]), atol=1e-5, rtol=0)


def test_gradients_reach_pixels(model):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mu = model.differentiable(images, ["a cat", "a red cube on a table"])
    assert mu.shape == (2,) and mu.requires_grad
    mu.sum().backward()
    assert torch.isfinite(images.grad).all() and (images.grad != 0).float().mean() > 0.99


def test_registry_and_checkpoint_errors_are_one_line(tmp_path):
    assert "hpsv3" in rewards.available()
    assert isinstance(rewards.load("hpsv3", CHECKPOINT / "HPSv3.safetensors"), HPSv3Model)
    cases = [
        (None, r"hpsv3 needs a local checkpoint.*MizzenAI/HPSv3.*--checkpoint hpsv3=DIR"),
        (tmp_path / "nowhere", r"HPSv3 checkpoint not found: .*nowhere .*MizzenAI/HPSv3.*--checkpoint hpsv3=PATH"),
    ]
    lonely = tmp_path / "weights-only"
    lonely.mkdir()
    shutil.copy(CHECKPOINT / "HPSv3.safetensors", lonely)
    cases.append((lonely, r"config\.json not found.*Qwen/Qwen2-VL-7B-Instruct.*--option hpsv3\.base=DIR"))
    for checkpoint, message in cases:
        with pytest.raises(PrefalignError, match=message) as err:
            rewards.load("hpsv3", checkpoint)
        assert "\n" not in str(err.value)
    assert isinstance(load_hpsv3(lonely, base=CHECKPOINT), HPSv3Model)
    with pytest.raises(PrefalignError, match="unknown option"):
        load_hpsv3(CHECKPOINT, bsae=CHECKPOINT)


def test_loading_is_strict(tmp_path):
    state = load_file(str(CHECKPOINT / "HPSv3.safetensors"))
    for name, edit, message in [
        ("extra", {"rm_head.9.weight": torch.zeros(2)}, r"1 unexpected keys \(e\.g\. \['rm_head\.9\.weight'\]\)"),
        ("missing", {"rm_head.5.bias": None}, r"1 missing keys \(e\.g\. \['rm_head\.5\.bias'\]\)"),
        ("vocab", {"model.embed_tokens.weight": torch.zeros(3, 32)}, r"has 3 token embeddings"),
    ]:
        folder = tmp_path / name
        shutil.copytree(CHECKPOINT, folder)
        changed = {k: v for k, v in {**state, **edit}.items() if v is not None}
        save_file(changed, str(folder / "HPSv3.safetensors"))
        with pytest.raises(PrefalignError, match=message):
            load_hpsv3(folder)
    assert "lm_head.weight" in state  # the official layout carries it; the adapter ignores only that key


def test_bad_prompts_are_one_line(model):
    with pytest.raises(PrefalignError, match="2 images but 1 prompts"):
        model.score(IMAGES[:2], ["one"])
    with pytest.raises(PrefalignError, match=r"prompt 1 contains the special token <\|Reward\|>"):
        model.score(IMAGES[:2], ["fine", "rate <|Reward|> twice"])
    with pytest.raises(PrefalignError, match=r"float \[B, 3, H, W\]"):
        model.differentiable(torch.rand(3, 32, 32), ["x"])


def test_bfloat16_keeps_the_head_in_float32():
    """As upstream: a bf16 backbone, the rm_head in fp32 (its input is cast up explicitly, CPU has no autocast)."""
    low = load_hpsv3(CHECKPOINT, dtype=torch.bfloat16)
    assert low.rm_head[0].weight.dtype == torch.float32 and low.visual.patch_embed.proj.weight.dtype == torch.bfloat16
    got = low.score(IMAGES[:2], PROMPTS[:2])
    assert got.dtype == torch.float32 and torch.allclose(got, OFFICIAL[:2, 0], atol=2e-2, rtol=0)  # measured 4e-3
