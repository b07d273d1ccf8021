"""ReFL / DRaFT-K: the rollout reproduces the sampler, reward gradients reach the LoRA weights on the shapes teacher,
SD3 and FLUX, the loss forms, compute counting, exact resume, the reward's two paths agree, one-line config errors."""

import math
from pathlib import Path

import pytest
import torch

from prefalign import schemas
from prefalign.config import resolve_config
from prefalign.diffusion.generate import initial_noise, sample_images, sample_latents, timestep_pairs
from prefalign.diffusion.tiny import save_tiny_pipeline, tiny_pipeline
from prefalign.errors import PrefalignError
from prefalign.rewards.registry import load as load_reward
from prefalign.shapes.teacher import load_teacher
from prefalign.train import refl
from prefalign.train.common import MetricsLog
from prefalign.train.policy import Policy

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a red circle", "two blue squares"]
QUIET = {"log": lambda _: None}
NO_CLIP_AT_ZERO = "reward.options.shapes-clip.clip_at_zero=false"  # tiny random VAEs: cos < 0, see below


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flow")
    return {family: str(save_tiny_pipeline(root / family, family, seed=2, sample_size=8)) for family in ("sd3", "flux")}


def tiny_config(out: Path, *extra: str, model: str | None = None) -> dict:
    overrides = [f"model={model}" if model else "model=null", "sample.steps=4", "sample.guidance=3",
                 "backprop.stop_range=[1,3]", "train.steps=2", "train.batch_size=2", "train.grad_accum=1",
                 "train.lr=1e-3", "train.log_every=1", "train.checkpoint_every=2", "eval.every=0",
                 "policy.lora_rank=4", *extra]
    return resolve_config(refl.DEFAULTS, None, overrides, schema=schemas.REFL, command="align --method refl",
                          out=str(out), device="cpu")


def test_reward_loss_forms():
    r = torch.tensor([1.0, 3.0])
    assert torch.equal(refl.reward_loss(r, 0.5), torch.tensor([-0.5, -1.5]))
    assert torch.equal(refl.reward_loss(r, 1e-3, margin=2.0), torch.tensor([1e-3, 0.0]))  # ReFL.py's ReLU(2 − r)


def test_grad_window_draws_the_stop_step_in_range_and_draft_takes_the_last_k():
    config = resolve_config(refl.DEFAULTS)
    generator = torch.Generator().manual_seed(0)
    draws = {refl.grad_window(config, generator) for _ in range(200)}
    assert {stop for _, stop in draws} == set(range(30, 40)) and all(a == b for a, b in draws)
    draft = resolve_config(refl.DEFAULTS, None, ["backprop.mode=draft", "backprop.last_k=3"])
    assert refl.grad_window(draft, generator) == (37, 39)


@pytest.mark.parametrize("family", ["shapes", "sd3"])
def test_rollout_is_the_models_sampler_and_draft_1_is_refl_at_the_last_step(family):
    model = load_teacher() if family == "shapes" else tiny_pipeline(family, seed=2, sample_size=8)
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts([""])
    x_T = initial_noise(model.sample_shape, [0, 1])
    grid = timestep_pairs(model.schedule, 4, **model.sampler_kwargs())
    sample = {"guidance": 3.0, "eta": 0.0}
    with torch.no_grad():
        expected = sample_latents(lambda x, t: model.guided(x, t, cond, uncond, 3.0), x_T, model.schedule, 4,
                                  **model.sampler_kwargs())
        last = refl.rollout(model, cond, uncond, x_T, grid, 4, 3, sample)
    torch.testing.assert_close(last.prev_sample, expected, rtol=1e-5, atol=1e-5)
    if family == "sd3":  # flow's final step lands on x̂_0
        torch.testing.assert_close(last.pred_x0, last.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "mode"), [("shapes", "refl"), ("sd3", "draft"), ("flux", "refl")])
def test_reward_gradient_reaches_every_lora_layer(family, mode, flow_dirs):
    model = load_teacher() if family == "shapes" else tiny_pipeline(family, seed=2, sample_size=8)
    Policy(model, lora_rank=4, reference="none")
    with torch.no_grad():  # LoRA's B starts at zero, which zeroes the gradient of A: give B a value
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(name)))
    config = resolve_config(refl.DEFAULTS, None, ["sample.steps=4", "sample.eta=0.5", f"backprop.mode={mode}",
                                                  "backprop.stop_range=[2,2]", "backprop.last_k=2"])
    grid = timestep_pairs(model.schedule, 4, **model.sampler_kwargs())
    grad_from, stop = refl.grad_window(config, torch.Generator().manual_seed(0))
    x_T = initial_noise(model.sample_shape, [0, 1])
    out = refl.rollout(model, model.encode_prompts(PROMPTS), model.encode_prompts([""]), x_T, grid, grad_from,
                       stop, config["sample"], torch.Generator().manual_seed(1))
    latents = out.pred_x0 if mode == "refl" else out.prev_sample
    # The random tiny VAEs give cos < 0, where CLIPScore's max(cos, 0) has no gradient.
    reward = load_reward("0.5*shapes-clip+shapes-clip", per_reward={"shapes-clip": {"clip_at_zero": False}})
    rewards = reward.differentiable(model.decode(latents), PROMPTS)
    refl.reward_loss(rewards, 1.0).mean().backward()
    grads = {n: p.grad for n, p in model.denoiser.named_parameters() if p.requires_grad}
    assert grads and all("lora" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(bool(g.abs().sum() > 0) for g in grads.values()) > 0.9 * len(grads)


def test_two_steps_on_the_shapes_teacher_with_a_weighted_sum_reward(tmp_path):
    config = tiny_config(tmp_path, "reward.spec=0.5*shapes-clip+shapes-clip", "reward.margin=200", "eval.every=2",
                         "eval.num_prompts=2", "eval.steps=2", "eval.rewards=[shapes-clip]")
    refl.train(config, tmp_path, **QUIET)
    rows = MetricsLog(tmp_path / "metrics.csv").rows
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) and r["reward"] > 0 for r in rows)
    for row in rows:  # one CFG'd gradient step at the stop step, the steps before it without gradient
        assert row["loss"] == pytest.approx(1e-3 * (200 - row["reward"]), rel=1e-4)
    stops = [r["stop"] for r in rows]
    assert rows[-1]["fb_calls"] == 2 * 2 * 2 and rows[-1]["fwd_calls"] == sum(stops) * 2 * 2
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainable"]
    b = [v for n, v in state.items() if "lora_B" in n]
    assert b and all(torch.isfinite(v).all() for v in b) and sum(bool(v.abs().sum() > 0) for v in b) > len(b) / 2
    assert [r["step"] for r in MetricsLog(tmp_path / "eval.csv").rows] == [0, 2]


@pytest.mark.parametrize(("family", "extra"), [("sd3", ("backprop.mode=draft", "backprop.last_k=2")),
                                               ("flux", ("sample.eta=0.7",))])
def test_two_steps_on_tiny_flow_models_change_the_saved_weights(family, extra, flow_dirs, tmp_path, monkeypatch):
    from prefalign.diffusion.families import flux
    from prefalign.diffusion.models import DiffusionModel

    monkeypatch.setattr(flux, "FLUX_DEFAULT_SAMPLE_SIZE", 8)  # a saved FLUX has no size: FluxPipeline's 128

    out = refl.train(tiny_config(tmp_path, *extra, NO_CLIP_AT_ZERO, model=flow_dirs[family]), tmp_path, **QUIET)
    saved, base = DiffusionModel.from_pretrained(out), DiffusionModel.from_pretrained(flow_dirs[family])
    assert saved.family == family
    assert any(not torch.equal(p, q) for p, q in zip(saved.denoiser.parameters(), base.denoiser.parameters(),
                                                      strict=True))
    rows = MetricsLog(tmp_path / "metrics.csv").rows
    if "backprop.mode=draft" in extra:  # the last 2 of 4 steps under gradient, CFG batch of 2 rows
        assert rows[-1]["fb_calls"] == 2 * 2 * 2 * 2 and rows[-1]["fwd_calls"] == 2 * 2 * 2 * 2
        assert rows[-1]["compute"] == 16 + 3 * 16


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    pixel = str(save_tiny_pipeline(tmp_path / "pixel", "pixel"))
    extra = ("sample.eta=1", NO_CLIP_AT_ZERO, "train.grad_accum=2", "train.ema_decay=0.9", "train.checkpoint_every=1")
    torch.manual_seed(0)  # LoRA's A initialisation; the resumed run loads it from the checkpoint
    refl.train(tiny_config(tmp_path / "a", *extra, model=pixel), tmp_path / "a", **QUIET)
    refl.train(tiny_config(tmp_path / "a", *extra, "train.steps=4", "resume=true", model=pixel), tmp_path / "a",
               **QUIET)
    torch.manual_seed(0)
    refl.train(tiny_config(tmp_path / "b", *extra, "train.steps=4", model=pixel), tmp_path / "b", **QUIET)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 4 and a["fb_calls"] == b["fb_calls"] and a["fwd_calls"] == b["fwd_calls"]
    assert any(bool(v.abs().sum() > 0) for n, v in a["trainable"].items() if "lora_B" in n)
    for name, value in a["trainable"].items():
        assert torch.equal(value, b["trainable"][name]), name
    for x, y in zip(a["ema"], b["ema"], strict=True):
        assert torch.equal(x, y)
    rows_a, rows_b = ([{k: v for k, v in r.items() if k != "seconds"} for r in MetricsLog(tmp_path / d /
                                                                                      "metrics.csv").rows] for d in "ab")
    assert rows_a == rows_b and [r["step"] for r in rows_a] == [1, 2, 3, 4]


@pytest.mark.parametrize("spec", ["shapes-clip", "0.5*shapes-clip+shapes-clip"])
def test_differentiable_reward_matches_the_scoring_path_on_decoded_images(spec):
    """`score` rounds float images to 8 bits (the official PIL path); `differentiable` sees the floats. On the
    same 8-bit images they agree to 1e-4; on the raw floats the 8-bit quantisation (≤ 1/510 per pixel) moves a
    0–100 (or 0–150) score by up to 0.12 on these samples (0.06–0.12 across two shipped teachers): bound 0.25."""
    prompts = [*PROMPTS, "a small green triangle above a yellow circle", "three purple stars"]
    images = sample_images(load_teacher(), prompts, [0, 1, 2, 3], num_steps=6, guidance_scale=3.0)
    reward = load_reward(spec)
    scored = reward.score(images, prompts)
    rounded = (images * 255).round() / 255
    torch.testing.assert_close(reward.differentiable(rounded, prompts).detach(), scored, rtol=0, atol=1e-4)
    torch.testing.assert_close(reward.differentiable(images, prompts).detach(), scored, rtol=0, atol=0.25)


@pytest.mark.parametrize(("override", "message"), [
    ("backprop.last_k=0", "'backprop.last_k' must be >= 1, got 0"),
    ("backprop.mode=alignprop", "backprop.mode 'alignprop' unknown; use one of refl, draft"),
    ("reward.alpha=0", "'reward.alpha' must be > 0, got 0"),
    ("sample.eta=-1", "'sample.eta' must be >= 0"),
])
def test_bad_values_are_one_line_schema_errors(override, message, tmp_path):
    with pytest.raises(PrefalignError, match=None) as error:
        tiny_config(tmp_path, override)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (("backprop.mode=draft", "backprop.last_k=5"), "backprop.last_k must be between 1 and sample.steps (4)"),
    (("backprop.stop_range=[2,4]",), "backprop.stop_range must be [low, high] with 0 <= low <= high < sample.steps"),
    (("backprop.stop_range=[3,1]",), "backprop.stop_range must be [low, high]"),
    (("backprop.stop_range=[0.5,2]",), "backprop.stop_range must be [low, high]"),
])
def test_inconsistent_settings_fail_before_any_model_loads(overrides, message, tmp_path):
    with pytest.raises(PrefalignError) as error:
        refl.train(tiny_config(tmp_path, *overrides), tmp_path, **QUIET)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_every_key_is_documented_and_the_shipped_configs_validate():
    from prefalign.config import leaf_keys, render_config

    keys, schema = set(leaf_keys(refl.DEFAULTS)), schemas.REFL
    free = [f for f, field in schema.items() if field.free]
    undocumented = [k for k in keys if not (k in schema and schema[k].doc) and not any(k.startswith(f"{f}.")
                                                                                        for f in free)]
    assert not undocumented and not [k for k in schema if k not in keys and not schema[k].free]
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("align_refl.yaml", "align_refl_shapes.yaml"):
        resolve_config(refl.DEFAULTS, configs / name, [], schema=schemas.REFL, command="align --method refl")
    full = (configs / "align_refl.yaml").read_text().split("\n", 3)[3]  # below the 3-line header
    assert full.strip() == render_config(resolve_config(refl.DEFAULTS), schemas.REFL).strip()


DDP_SCRIPT = """
import sys
from prefalign import schemas
from prefalign.config import resolve_config
from prefalign.runs import start_run
from prefalign.train import refl
config = resolve_config(refl.DEFAULTS, None, sys.argv[2:], schema=schemas.REFL, out=sys.argv[1], device="cpu")
config, run_dir = start_run(config, None, None)
refl.train(config, run_dir, log=lambda _: None)
"""


@pytest.mark.slow
def test_two_process_gloo_draft_run_matches_one_process(tmp_path, launch):
    """DDP over 2 CPU processes (1 prompt each) with two gradient forwards per micro-batch (DRaFT-2) takes the same
    steps as one process with 2 prompts (deterministic sampler: η > 0 noise is drawn per process)."""
    pixel = str(save_tiny_pipeline(tmp_path / "pixel", "pixel"))
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    common = [f"model={pixel}", "sample.steps=4", "sample.guidance=3", "sample.eta=0", "backprop.mode=draft",
              "backprop.last_k=2", "train.steps=2", "train.grad_accum=1", "train.lr=1e-3", "eval.every=0",
              NO_CLIP_AT_ZERO]
    for name, processes, batch in (("one", 1, 2), ("two", 2, 1)):
        launch([str(script), str(tmp_path / name), *common, f"train.batch_size={batch}"], processes)
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two"))
    assert one["fb_calls"] == two["fb_calls"] == 2 * 2 * 2 * 2  # steps × K × prompts × CFG rows
    base = tiny_pipeline("pixel").denoiser.state_dict()
    update_one, update_two = (torch.cat([(s[k] - base[k]).flatten() for k in base]) for s in (one["trainable"],
                                                                                               two["trainable"]))
    assert update_one.abs().mean() > 1e-4  # measured 1.4e-3 apart from 1.6e-8
    assert (update_one - update_two).abs().mean() < 1e-3 * update_one.abs().mean()
