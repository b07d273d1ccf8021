"""Diff-Instruct++ on rectified-flow models: the score of a velocity, timesteps on the flow axis, the one-step
generator at σ = 1, the IKL gradient's zero while s_ψ equals the reference (both families), and LoRA training
steps on tiny SD3 and FLUX transformers and a flow shapes teacher."""

import json

import pytest
import torch

from prefalign.config import deep_merge, resolve_config
from prefalign.diffusion.models import DiffusionModel
from prefalign.diffusion.one_step import initial_timestep, load_generator, one_step_source, one_step_x0
from prefalign.diffusion.schedules import FlowSchedule, NoiseSchedule
from prefalign.diffusion.tiny import tiny_pipeline
from prefalign.errors import PrefalignError
from prefalign.runs import start_run
from prefalign.shapes.teacher import build_teacher
from prefalign.train import dipp, loop
from prefalign.train.common import make_accelerator
from prefalign.train.loop import Run, make_optimizer
from prefalign.train.policy import Policy
from prefalign.train.pretrain import PRETRAIN_DEFAULTS

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a red circle", "two blue squares"]
TINY_ARCH = [  # the shapes teacher's architecture at test size (as tests/test_shapes_teacher.py)
    "arch.unet.block_out_channels=[8, 8, 16, 16]", "arch.unet.norm_num_groups=8", "arch.unet.attention_head_dim=8",
    "arch.text.hidden_size=16", "arch.text.intermediate_size=32", "arch.text.num_hidden_layers=1",
    "arch.text.num_attention_heads=2", "arch.family=flow",
]
LORA = {"device": "cpu", "policy": {"lora_rank": 4}, "ta": {"lora_rank": 4}, "eval": {"every": 0},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 2}}


def _run_of(model: DiffusionModel, tmp_path) -> Run:
    """What `train_policy` hands a method: a LoRA policy (reference = adapters off) prepared on one CPU process."""
    config = deep_merge(dipp.DEFAULTS, {"device": "cpu"})
    accelerator = make_accelerator(config, accumulation_steps=1)
    policy = Policy(model, 4, 4.0, reference="adapter")
    policy.prepare(accelerator, make_optimizer(policy.trainable_parameters(), config["train"]))
    return Run(config, tmp_path, accelerator, policy, lambda _: None)


def _train(model_dir, out, **sections):
    config, run_dir = start_run(deep_merge(dipp.DEFAULTS, deep_merge(LORA, sections)) | {"model": str(model_dir)},
                                None, [], out=str(out))
    return dipp.train(config, run_dir, log=lambda _: None)


def test_velocity_score_and_the_flow_axis():
    """score = −(x_σ + (1 − σ)v)/σ and x̂_0 = x_σ − σv; π(t)'s table entries are the VP timestep itself or σ_i·T on
    the (shifted) flow table."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9]).view(-1, 1, 1, 1)
    score, x0 = dipp.model_score(v, x, 1 - sigma, sigma, "flow_prediction")
    torch.testing.assert_close(score, -(x + (1 - sigma) * v) / sigma)
    torch.testing.assert_close(x0, x - sigma * v)
    index = torch.tensor([0, 20, 500, 980, 999])
    sd3 = FlowSchedule(shift=3.0)
    torch.testing.assert_close(dipp.table_timesteps(sd3, index), sd3.sigmas[index] * 1000)
    assert dipp.table_timesteps(sd3, index)[-1] == 1000  # σ = 1
    assert torch.equal(dipp.table_timesteps(NoiseSchedule.make("scaled_linear"), index), index)


@pytest.mark.parametrize(("family", "neutral", "other"), [("pixel", 1.0, 3.0), ("sd3", 1.0, 3.0), ("flux", 3.5, 1.0)])
def test_ikl_gradient_is_zero_while_the_ta_equals_the_reference(tmp_path, family, neutral, other):
    """At initialisation s_ψ = s_ref, so at the guidance where s̃_ref is the plain conditional score (1, or FLUX's
    distilled default 3.5 that its plain forward uses) the IKL gradient on the generator's LoRA is exactly zero;
    another guidance adds CFG's implicit reward and a non-zero gradient."""
    run = _run_of(tiny_pipeline(family, seed=1, sample_size=8), tmp_path)
    ta, model = dipp.TeachingAssistant(run, None, None, 1e-3), run.policy.model
    lora = [p for name, p in model.denoiser.named_parameters() if "lora" in name]
    g = torch.Generator().manual_seed(0)
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts([""])
    x0 = one_step_x0(model, torch.randn(2, *model.sample_shape, generator=g), cond, initial_timestep(model))
    t, noise = dipp.table_timesteps(model.schedule, torch.tensor([100, 700])), torch.randn(x0.shape, generator=g)

    def lora_grads(guidance: float) -> tuple[list[torch.Tensor], float]:
        ikl, size = dipp.ikl_term(run.policy, ta.model, x0, cond, uncond, t, noise, guidance, "dmd")
        grads = torch.autograd.grad(ikl.mean(), lora, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if d is None else d for p, d in zip(lora, grads, strict=True)], size

    zero, size = lora_grads(neutral)
    assert size == 0 and all(torch.equal(d, torch.zeros_like(d)) for d in zero)
    moved, size = lora_grads(other)
    assert size > 0 and all(torch.isfinite(d).all() for d in moved) and any(d.abs().sum() > 0 for d in moved)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_two_lora_steps_on_flow_transformers(tmp_path, monkeypatch, family):
    """Two DI++ steps with LoRA generator and TA: finite, non-zero gradients reach the generator's LoRA, the
    generator starts at σ = 1 and its saved weights moved."""
    model = tiny_pipeline(family, seed=2, sample_size=8)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    monkeypatch.setattr(loop, "load_base_model", lambda spec, device: model)  # a saved FLUX reloads at 128²
    grads: list[torch.Tensor] = []
    build = dipp.dipp_method

    def recording(run: Run) -> loop.Method:
        for name, p in run.policy.model.denoiser.named_parameters():
            if "lora_B" in name:
                p.register_hook(lambda grad: grads.append(grad.detach().clone()))
        return build(run)

    monkeypatch.setattr(dipp, "dipp_method", recording)
    out = _train("in-memory", tmp_path / family)
    assert grads and all(torch.isfinite(d).all() for d in grads) and any(d.abs().sum() > 0 for d in grads)
    meta = json.loads((out / "one_step.json").read_text())
    assert meta["t_init"] == 1000 and meta["method"] == "dipp"
    after = load_generator(out)[0].denoiser.state_dict()
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)
    rows = (tmp_path / family / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "ta_loss" in rows[0] and "nan" not in "".join(rows[1:])


def test_flow_shapes_teacher_distils_with_lora(tmp_path):
    """The shapes teacher with a rectified-flow schedule: g_θ at σ = 1 is one Euler step z − v̂ from pure noise;
    two LoRA steps with evaluation train a generator that samples finite images."""
    teacher = build_teacher(resolve_config(PRETRAIN_DEFAULTS, None, TINY_ARCH)["arch"])
    assert isinstance(teacher.schedule, FlowSchedule) and initial_timestep(teacher) == 1000
    with pytest.raises(PrefalignError, match=r"generator\.t_init"):
        initial_timestep(teacher, 1001)
    cond, z = teacher.encode_prompts(PROMPTS[:1]), torch.randn(1, *teacher.sample_shape)
    with torch.no_grad():
        torch.testing.assert_close(one_step_x0(teacher, z, cond, 1000), z - teacher(z, 1000, cond))
    teacher.save_pretrained(tmp_path / "teacher")
    out = _train(tmp_path / "teacher", tmp_path / "run",
                 eval={"every": 2, "num_prompts": 2, "samples_per_prompt": 1, "rewards": ["shapes-oracle"]})
    model, meta = load_generator(out)
    images = one_step_source(model, meta["t_init"])(PROMPTS, [0, 1])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    evals = (tmp_path / "run" / "eval.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in evals[1:]] == ["0", "2"] and "diversity" in evals[0]
