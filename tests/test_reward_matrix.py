"""The mission's matrix: every named reward plugs into the reward-driven trainers on every model family.

Rewards are the real adapters on their tiny random-weight fixtures (aesthetic, ImageReward, HPS v2.1, PickScore,
CLIPScore and a weighted sum), named in the trainers' configs exactly as a user names them, with checkpoints and
options through `reward.checkpoints` / `reward.options`. Families are tiny random-weight pipelines of the real
architectures (SD, SDXL, PixArt, SD3, FLUX). Each cell runs two optimizer steps with LoRA and checks that finite
gradients reach the policy (non-zero on lora_B at the first step, as B starts at zero).

The default suite runs a pairwise cover (every family×reward pair once, the method rotating so that every
method×family and method×reward pair also appears: 30 cells); `PREFALIGN_FULL_MATRIX=1` runs the full cross
(90 cells). Periodic evaluation with every reward is covered by one DPO and one SPO run scoring all of them, and
each reward's differentiable path is compared with its no-grad path on the same decoded images.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from prefalign.config import deep_merge
from prefalign.diffusion.families import flux
from prefalign.diffusion.models import DiffusionModel
from prefalign.diffusion.tiny import save_tiny_pipeline
from prefalign.rewards.clip_common import write_clip_processor_files
from prefalign.rewards.registry import load
from prefalign.train import dipp, dpo, grpo, loop, refl

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux")
REWARDS = ("aesthetic", "imagereward", "hpsv2.1", "pickscore", "clipscore", "0.5*pickscore+hpsv2.1")
METHODS = ("dipp", "grpo", "refl")
TRAINERS = {"dipp": dipp, "grpo": grpo, "refl": refl}
# The smallest run of each method: two optimizer steps, two-step sampling, LoRA rank 2, no evaluation.
TINY = {
    "dipp": {"train": {"steps": 2, "batch_size": 2}},
    "grpo": {"sample": {"steps": 2, "group_size": 2, "prompts_per_step": 2, "guidance": 2.0},
             "train": {"steps": 2, "batch_size": 2}},
    "refl": {"sample": {"steps": 2, "guidance": 2.0}, "backprop": {"mode": "refl", "stop_range": [0, 1]},
             "train": {"steps": 2, "batch_size": 2, "grad_accum": 1}},
}
# |differentiable − score| on 16×16 decoded 8-bit images (measured maxima in benchmarks/RESULTS.md): the no-grad
# path resizes with PIL as the official code, the differentiable one with torch's antialiased bicubic; HPS's
# letterbox of a square image is a plain resize in both.
DIFFERENTIABLE_TOLERANCE = {"aesthetic": 2e-3, "imagereward": 3e-3, "hpsv2.1": 1e-5, "pickscore": 5e-3,
                            "clipscore": 1e-2, "0.5*pickscore+hpsv2.1": 3e-3}


def _cells() -> list[tuple[str, str, str]]:
    if os.environ.get("PREFALIGN_FULL_MATRIX") == "1":
        return list(itertools.product(METHODS, FAMILIES, REWARDS))
    return [(METHODS[(i + j) % len(METHODS)], family, reward)
            for (i, family), (j, reward) in itertools.product(enumerate(FAMILIES), enumerate(REWARDS))]


@pytest.fixture(scope="module")
def reward_settings(tmp_path_factory) -> dict:
    """`reward.checkpoints` and `reward.options` that load every fixture reward by its registry name."""
    root = tmp_path_factory.mktemp("reward-fixtures")
    processor = str(write_clip_processor_files(root / "clip_processor"))
    expected = json.loads((FIXTURES / "imagereward" / "expected.json").read_text())
    imagereward = root / "ImageReward.pt"
    torch.save(_imagereward_recipe().recipe_state_dict(expected["tiny"]["official_shapes"]), imagereward)
    rewards = FIXTURES / "rewards"
    open_clip = {"model_config": str(rewards / "openclip_tiny.json")}
    return {
        "checkpoints": {"aesthetic": str(rewards / "aesthetic_head.safetensors"), "imagereward": str(imagereward),
                        "hpsv2.1": str(rewards / "openclip_tiny.safetensors"),
                        "pickscore": str(rewards / "hf_clip_tiny"), "clipscore": str(rewards / "hf_clip_tiny")},
        "options": {"aesthetic": {"clip_checkpoint": str(rewards / "aesthetic_visual.safetensors"),
                                  "model_config": str(rewards / "aesthetic_tiny.json")},
                    "imagereward": {"arch": expected["tiny"]["arch"]}, "hpsv2.1": open_clip,
                    "pickscore": {"processor": processor},
                    # Random tiny towers give negative cosines, where max(cos, 0) has no gradient: raw cosine.
                    "clipscore": {"processor": processor, "clip_at_zero": False}},
    }


def _imagereward_recipe():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "imagereward_parity_fixtures.py"
    spec = importlib.util.spec_from_file_location("imagereward_parity_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix-pipelines")
    return {family: save_tiny_pipeline(root / family, family, seed=3, sample_size=8) for family in FAMILIES}


@pytest.fixture
def small_flux(monkeypatch):
    monkeypatch.setattr(flux, "FLUX_DEFAULT_SAMPLE_SIZE", 8)  # a saved FLUX has no size: FluxPipeline's 128


def _recording_gradients(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Every optimizer step's gradients of the trainable parameters, by name."""
    grads: list[dict[str, torch.Tensor]] = []
    real = loop.make_optimizer

    def recording(params, train, lr=None):
        optimizer, step = real(params, train, lr), None
        step = optimizer.step

        def recorded(*args, **kwargs):
            grads.append({f"{i}:{tuple(p.shape)}:{getattr(p, '_lora_name', '')}": p.grad.clone()
                          for i, p in enumerate(params) if p.grad is not None})
            return step(*args, **kwargs)

        optimizer.step = recorded
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", recording)
    return grads


@pytest.mark.parametrize(("method", "family", "reward"), _cells())
def test_reward_drives_trainer_on_family(method, family, reward, pipelines, reward_settings, small_flux, tmp_path,
                                         monkeypatch):
    grads = _recording_gradients(monkeypatch)
    trainer = TRAINERS[method]
    config = deep_merge(trainer.DEFAULTS, deep_merge(TINY[method], {
        "device": "cpu", "model": str(pipelines[family]), "out": str(tmp_path),
        "policy": {"lora_rank": 2, "lora_alpha": 2.0}, "eval": {"every": 0},
        "reward": {"spec": reward, **reward_settings},
    }))
    trainer.train(config, tmp_path, log=lambda _: None)
    assert len(grads) == 2 and all(grads), f"{method}/{family}/{reward}: no gradient reached the policy"
    assert all(torch.isfinite(g).all() for step in grads for g in step.values())
    assert any(g.abs().sum() > 0 for g in grads[0].values()), f"{method}/{family}/{reward}: zero gradients"


@pytest.mark.parametrize("reward", REWARDS)
def test_differentiable_path_equals_score_path_on_decoded_images(reward, pipelines, reward_settings, small_flux):
    """Each reward scores the families' decoded images alike with and without gradients (8-bit images: `score`
    quantises like a saved PNG)."""
    model = load(reward, reward_settings["checkpoints"], "cpu", per_reward=reward_settings["options"])
    prompts = ["a red circle", "two blue squares left of a green triangle"]
    for family in ("sd", "flux"):
        tiny = DiffusionModel.from_pretrained(pipelines[family])
        images = tiny.decode(torch.randn(2, *tiny.sample_shape, generator=torch.Generator().manual_seed(0)))
        images = (images.clamp(0, 1) * 255).round() / 255
        with torch.no_grad():
            plain = model.score(images, prompts).float()
        pixels = images.clone().requires_grad_(True)
        differentiable = model.differentiable(pixels, prompts)
        differentiable.sum().backward()
        assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
        torch.testing.assert_close(differentiable.detach().float(), plain, atol=DIFFERENTIABLE_TOLERANCE[reward],
                                   rtol=0)


def test_periodic_evaluation_scores_every_reward_in_dpo(pipelines, reward_settings, tmp_path):
    """One DPO step on SD with evaluations at steps 0 and 1 that score all six rewards."""
    from prefalign.shapes.labels import make_preference_dataset

    make_preference_dataset(tmp_path / "pairs", 8, seed=3)
    config = deep_merge(dpo.DEFAULTS, {
        "device": "cpu", "model": str(pipelines["sd"]), "out": str(tmp_path / "run"),
        "data": {"source": str(tmp_path / "pairs" / "train.parquet")}, "policy": {"lora_rank": 2},
        "train": {"steps": 1, "batch_size": 2, "log_every": 1},
        "eval": {"every": 1, "num_prompts": 2, "steps": 2, "batch_size": 2, "rewards": list(REWARDS),
                 "reward_checkpoints": reward_settings["checkpoints"], "reward_options": reward_settings["options"]},
    })
    dpo.train(config, tmp_path / "run", log=lambda _: None)
    evals = pd.read_csv(tmp_path / "run" / "eval.csv")
    assert evals["step"].tolist() == [0, 1]
    assert evals[list(REWARDS)].notna().all().all() and evals[[f"{r}_lo" for r in REWARDS]].notna().all().all()


@pytest.mark.parametrize(("backbone", "family"), [("hf-clip", "sd"), ("open_clip", "sdxl")])
def test_step_aware_model_on_clip_backbones_drives_spo_on_a_latent_model(backbone, family, pipelines,
                                                                         reward_settings, tmp_path):
    """The step-aware preference model on a PickScore-style HF CLIP and an HPS-style open_clip backbone scores the
    VAE-decoded x̂_0 of a latent model's SPO pools; SPO trains two steps and evaluates every reward on the way."""
    from prefalign.rewards.trainable import build_scorer, save_scorer
    from prefalign.runs import start_run
    from prefalign.train import spo

    options = reward_settings["options"]
    if backbone == "hf-clip":
        scorer = build_scorer("clip", "hf-clip", reward_settings["checkpoints"]["pickscore"], time_conditioned=True,
                              processor=options["pickscore"]["processor"])
    else:
        scorer = build_scorer("clip", "open_clip:ViT-H-14", reward_settings["checkpoints"]["hpsv2.1"],
                              time_conditioned=True, **options["hpsv2.1"])
    save_scorer(scorer, tmp_path / "scorer", {"guidance": 3.0})
    overrides = {
        "model": str(pipelines[family]), "preference.checkpoint": str(tmp_path / "scorer"), "data.num_prompts": 4,
        "policy.lora_rank": 2, "sample.steps": 4, "sample.batch_size": 2, "sample.pool_size": 2,
        "sample.threshold": -1.0, "sample.guidance": 3.0, "sample.timestep_range": "[0,750]", "train.steps": 2,
        "train.batch_size": 2, "train.lr": 1e-3, "train.log_every": 1, "eval.every": 2, "eval.num_prompts": 2,
        "eval.steps": 2, "eval.rewards": f"[{','.join(REWARDS[1:3])}]",
        "eval.reward_checkpoints": json.dumps(reward_settings["checkpoints"]),
        "eval.reward_options": json.dumps(options),
    }
    config, run_dir = start_run(spo.DEFAULTS, None, [f"{k}={v}" for k, v in overrides.items()], out=str(tmp_path / "run"),
                                device="cpu")
    spo.train(config, run_dir, log=lambda _: None)
    metrics, evals = pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(run_dir / "eval.csv")
    assert metrics["pairs"].iloc[0] > 0 and metrics["loss"].notna().all()
    assert evals["step"].tolist() == [0, 2] and evals[list(REWARDS[1:3])].notna().all().all()
