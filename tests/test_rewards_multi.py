"""The multi-reward pass: same scores as each reward alone, one decode per image, one forward per shared image
tower, weighted sums split into components, unreadable files reported, rewards without the pixel protocol."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prefalign.rewards import load
from prefalign.rewards import multi as multi_module
from prefalign.rewards.clip_common import write_clip_processor_files
from prefalign.rewards.multi import RewardPass
from prefalign.shapes.rewards import ShapesOracleReward

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rewards"
CKPT, TINY = FIXTURES / "openclip_tiny.safetensors", FIXTURES / "openclip_tiny.json"
IMAGES = sorted(str(p) for p in (FIXTURES / "images").glob("*.png"))
pytestmark = pytest.mark.filterwarnings("ignore:.*(empty prompt|truncated)")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    processor = write_clip_processor_files(tmp_path_factory.mktemp("proc"))
    return {
        "hpsv2.1": load("hpsv2.1", CKPT, model_config=TINY),
        "clipscore": load("clipscore", CKPT, backend="open_clip", model_config=TINY),
        "pickscore": load("pickscore", FIXTURES / "hf_clip_tiny", processor=processor),
        "clip-hf": load("clipscore", FIXTURES / "hf_clip_tiny", processor=processor, clip_at_zero=False),
        "sum": load("hpsv2.1-0.5*clipscore", {"hpsv2.1": CKPT, "clipscore": CKPT},
                    per_reward={"hpsv2.1": {"model_config": TINY},
                                "clipscore": {"backend": "open_clip", "model_config": TINY, "clip_at_zero": False}}),
    }


def _run(models: dict, sources, prompts, **kwargs) -> tuple[dict, dict]:
    scores, failed = {name: [] for name in models}, {}
    for batch in RewardPass(models, **kwargs).run(sources, prompts):
        failed.update(batch.failed)
        for name in models:
            scores[name] += batch.scores[name]
    return {k: torch.tensor(v) for k, v in scores.items()}, failed


@pytest.mark.parametrize("workers", [0, 2])
def test_pass_matches_each_reward_alone(models, workers):
    prompts = [f"prompt {i % 2}" for i in range(len(IMAGES))]
    scores, failed = _run(models, IMAGES, prompts, batch_size=4, workers=workers)
    assert not failed
    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone = model.score(IMAGES, prompts, batch_size=4)
        assert torch.allclose(scores[name], alone, atol=1e-5), name


def test_shared_tower_and_preprocessing_run_once(models, monkeypatch):
    pick, clip_hf = models["pickscore"], models["clip-hf"]  # same weights file and pixels: one image forward
    calls = {"encode": 0, "decode": 0}
    original_encode, original_decode = type(pick).encode_image, multi_module.decode

    def counting_encode(self, pixels):
        calls["encode"] += 1
        return original_encode(self, pixels)

    def counting_decode(source):
        calls["decode"] += 1
        return original_decode(source)

    monkeypatch.setattr(type(pick), "encode_image", counting_encode)
    monkeypatch.setattr(multi_module, "decode", counting_decode)
    scoring = RewardPass({"pickscore": pick, "clipscore": clip_hf, "sum": models["sum"]}, batch_size=8, workers=0)
    # The sum brings hpsv2.1 (letterbox pixels) and an open_clip clipscore (centre-crop pixels, other tower).
    assert len(scoring.leaves) == 4 and len(scoring.preprocess) == 3 and len(scoring.groups) == 3
    _run({"pickscore": pick, "clipscore": clip_hf, "sum": models["sum"]}, IMAGES, ["x"] * len(IMAGES),
         batch_size=8, workers=0)
    assert calls == {"encode": 1, "decode": len(IMAGES)}  # one batch: one tower forward, each file decoded once


def test_unreadable_files_are_reported_and_others_scored(models, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    sources = [IMAGES[0], str(bad), IMAGES[1]]
    scores, failed = _run({"hpsv2.1": models["hpsv2.1"]}, sources, ["a", "b", "c"], batch_size=2, workers=0)
    assert list(failed) == [1] and "broken.png" in failed[1] and len(scores["hpsv2.1"]) == 2


def test_rewards_without_the_pixel_protocol_get_float_tensors(models, tmp_path):
    oracle = ShapesOracleReward()
    prompts = ["a red circle"] * 3
    paths = []
    for i in range(3):  # the oracle scores 32x32 shapes-world images
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    scores, _ = _run({"oracle": oracle, "hps": models["hpsv2.1"]}, paths, prompts, batch_size=3, workers=0)
    assert torch.allclose(scores["oracle"], oracle.score(paths, prompts), atol=1e-6)
