"""GRPO: the loss and advantages in closed form, trained-step selection, the on-policy ratio of exactly 1 (VP and
flow), batch-split invariant log-probabilities, LoRA training on the shapes teacher and tiny SD3/FLUX, exact resume,
the CLI, one-line config errors, the demo stage and a 2-process run equal to one process."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.config import resolve_config
from prefalign.demo import DEMO_DEFAULTS, DemoContext
from prefalign.diffusion.generate import timestep_pairs
from prefalign.diffusion.tiny import save_tiny_pipeline
from prefalign.errors import PrefalignError
from prefalign.train import grpo
from prefalign.train.common import MetricsLog, make_accelerator
from prefalign.train.grpo_sampling import group_advantages, sample_rollout, score_transition, trained_steps
from prefalign.train.loop import Run
from prefalign.train.policy import Policy, load_base_model

RUNNER = CliRunner()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {family: str(save_tiny_pipeline(root / family, family, seed=2, sample_size=8)) for family in ("sd3", "flux")}


def tiny_overrides(model: str, steps: int, *extra: str) -> list[str]:
    return [f"model={model}", f"train.steps={steps}", "policy.lora_rank=4", "sample.steps=3", "sample.group_size=2",
            "sample.prompts_per_step=2", "train.batch_size=2", "reward.spec=shapes-oracle", "train.lr=1e-3",
            "train.checkpoint_every=2", "eval.every=0", *extra]


def tiny_config(model: str, out, steps: int, *extra: str) -> dict:
    return resolve_config(grpo.DEFAULTS, None, tiny_overrides(model, steps, *extra), out=str(out), device="cpu")


def lora_policy(model_spec: str) -> Policy:
    """A LoRA policy whose adapters are non-zero, so the adapted network differs from the base."""
    policy = Policy(load_base_model(model_spec, torch.device("cpu")), lora_rank=4, reference="adapter")
    with torch.no_grad():
        for name, p in policy.model.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return policy


def test_loss_on_policy_is_minus_mean_advantage_and_clips_off_policy():
    advantages = torch.tensor([2.0, -1.0, 7.0])
    log_prob = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    loss, stats = grpo.grpo_loss(log_prob, log_prob.detach(), advantages, 1e-4, 5.0)
    assert loss.item() == pytest.approx(-(2 - 1 + 5) / 3) and stats["ratio"] == 1.0 and stats["clipfrac"] == 0.0
    loss.backward()
    assert torch.allclose(log_prob.grad, -torch.tensor([2.0, -1.0, 5.0]) / 3)  # A clamped to ±5
    # Off policy, r = e^0.5 > 1 + ε: positive advantages use the clipped ratio (no gradient), negative ones do not.
    old = torch.zeros(2)
    new = torch.full((2,), 0.5, requires_grad=True)
    loss, stats = grpo.grpo_loss(new, old, torch.tensor([1.0, -1.0]), 0.2, 5.0, torch.tensor([0.5, 1.5]), 0.1)
    ratio = torch.exp(torch.tensor(0.5))
    assert loss.item() == pytest.approx((-1.2 + ratio.item()) / 2 + 0.1 * 1.0) and stats["clipfrac"] == 1.0
    loss.backward()
    assert new.grad[0] == 0 and new.grad[1] == pytest.approx(ratio.item() / 2)


def test_group_advantages_sum_and_per_reward():
    rewards = torch.tensor([[1.0, 10.0], [3.0, 10.0], [0.0, 0.0], [0.0, 4.0]])  # two groups of two, two terms
    summed = group_advantages(rewards, [1.0, 0.5], 2, "sum")
    assert torch.allclose(summed, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-3)  # (r − mean)/(std + 1e-4)
    per = group_advantages(rewards, [1.0, 0.5], 2, "per_reward")
    assert torch.allclose(per, torch.tensor([-1.0, 1.0, -0.5, 0.5]), atol=1e-3)  # a constant term adds nothing
    with pytest.raises(PrefalignError, match=r"reward\.advantage 'max' unknown"):
        group_advantages(rewards, [1.0, 1.0], 2, "max")


def test_trained_steps_fraction_selection_and_sde_window():
    g = torch.Generator().manual_seed(0)
    assert trained_steps(10, 0.99, "first", [0, 0, None], g) == (list(range(10)), list(range(9)))
    stochastic, steps = trained_steps(16, 0.6, "random", [0, 0, None], g)  # DanceGRPO: 9 of the first 15
    assert stochastic == list(range(16)) and len(steps) == 9 and max(steps) < 15 and steps == sorted(set(steps))
    for _ in range(20):
        stochastic, steps = trained_steps(10, 1.0, "first", [2, 0, 5], g)  # Flow-GRPO-Fast window
        assert stochastic == steps and len(steps) == 2 and steps[0] >= 0 and steps[1] <= 4
    with pytest.raises(PrefalignError, match="sde_window"):
        trained_steps(4, 1.0, "first", [4, 0, None], g)
    with pytest.raises(PrefalignError, match="timestep_fraction"):
        trained_steps(4, 0.1, "first", [0, 0, None], g)


def rollout_and_rescore(policy: Policy, seeds: list[int], prompts: list[str], guidance: float = 3.0,
                        eta: float = 1.0):
    """Sample trajectories and re-score every trained transition with gradients, as a training micro-batch."""
    model = policy.model
    kwargs = model.sampler_kwargs()
    pairs = timestep_pairs(model.schedule, 3, **kwargs)
    uncond, cond = model.encode_prompts([""]), model.encode_prompts(prompts)
    kind = torch.float32 if model.schedule.kind == "flow" else torch.long

    def denoise(x, t):
        return model.guided(x, t, cond, uncond, guidance)

    rollout = sample_rollout(denoise, cond, seeds, model.sample_shape, model.schedule, pairs, eta, [0, 1, 2],
                             [0, 1], torch.device("cpu"), model.dtype, **kwargs)
    new = []
    for j in range(2):
        t, prev_t = pairs[j]
        x_t = rollout.x_t[j]
        output = denoise(x_t, torch.full((len(x_t),), t, dtype=kind))
        new.append(score_transition(model.schedule, output, t, prev_t, x_t, rollout.x_prev[j], eta, **kwargs)[0])
    return rollout, new


@pytest.mark.parametrize("family", ["shapes", "sd3"])
def test_ratio_is_exactly_one_before_the_first_update(family, flow_dirs):
    policy = lora_policy("shapes-teacher" if family == "shapes" else flow_dirs["sd3"])
    rollout, new = rollout_and_rescore(policy, [5, 6, 7], [PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    for old, fresh in zip(rollout.log_prob, new, strict=True):
        assert fresh.requires_grad and torch.equal(fresh.detach(), old)
        assert torch.equal(torch.exp(fresh.detach() - old), torch.ones(3))


@pytest.mark.parametrize("family", ["shapes", "sd3"])
def test_log_probs_do_not_depend_on_the_batch_split(family, flow_dirs):
    """No reduction mixes samples: scored in a batch of 4 or alone, a transition's log-probability is bitwise the
    same for the same network output; end to end, only the network's own batch-size rounding remains."""
    policy = lora_policy("shapes-teacher" if family == "shapes" else flow_dirs["sd3"])
    model, kwargs = policy.model, policy.model.sampler_kwargs()
    seeds, prompts = [1, 2, 3, 4], [PROMPTS[i % 2] for i in range(4)]
    together, _ = rollout_and_rescore(policy, seeds, prompts)
    (t, prev_t), output = timestep_pairs(model.schedule, 3, **kwargs)[1], torch.randn_like(together.x_t[1])
    batch, _ = score_transition(model.schedule, output, t, prev_t, together.x_t[1], together.x_prev[1], 1.0, **kwargs)
    for i in range(4):
        row = slice(i, i + 1)
        alone, _ = score_transition(model.schedule, output[row], t, prev_t, together.x_t[1][row],
                                    together.x_prev[1][row], 1.0, **kwargs)
        assert torch.equal(alone, batch[row])
        sampled_alone, _ = rollout_and_rescore(policy, seeds[row], prompts[row])
        for j in range(2):
            assert torch.allclose(sampled_alone.x_prev[j][0], together.x_prev[j][i], atol=1e-5)
            assert sampled_alone.log_prob[j][0].item() == pytest.approx(together.log_prob[j][i].item(), abs=1e-5)


def first_micro_batch_grads(config: dict, tmp_path) -> list[torch.Tensor]:
    """Gradients of the LoRA parameters from the first micro-batch of step 0, built as the loop builds it."""
    accelerator = make_accelerator(config, accumulation_steps=1)
    policy = Policy(load_base_model(config["model"], accelerator.device), 4, None, config["policy"]["lora_targets"],
                    "adapter")
    method = grpo.grpo_method(Run(config, tmp_path, accelerator, policy, lambda _: None))
    micro = next(iter(method.micro_batches(0, torch.Generator().manual_seed(0))))
    assert micro.stats["ratio"] == 1.0 and micro.stats["approx_kl"] == 0.0
    micro.loss.backward()
    return [p.grad for p in policy.trainable_parameters()]


@pytest.mark.parametrize("family", ["shapes", "sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_two_lora_steps_train_each_family(family, flow_dirs, tmp_path):
    model = "shapes-teacher" if family == "shapes" else flow_dirs[family]
    extra = {"shapes": ("loss.kl_beta=0.1", "train.timestep_selection=random", "reward.advantage=per_reward",
                        "reward.spec=0.5*shapes-oracle+0.5*shapes-clip"),
             "sd3": ("loss.kl_beta=0.1", "sample.sde_window_size=2"),  # Flow-GRPO-Fast: SDE on steps 0-1 only
             "flux": ("sample.guidance=1", "loss.kl_beta=0")}[family]
    config = tiny_config(model, tmp_path / "run", 2, *extra)
    grads = first_micro_batch_grads(config, tmp_path / "grads")
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    grpo.train(config, tmp_path / "run", log=lambda _: None)
    rows = MetricsLog(tmp_path / "run" / "metrics.csv").rows
    assert [r["step"] for r in rows] == [1, 2] and all(r["approx_kl"] == 0.0 for r in rows)  # on-policy: ratio 1
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert any(float(v.abs().sum()) > 0 for k, v in state["trainable"].items() if "lora_B" in k)
    rows_per_forward = 1 if family == "flux" else 2  # the tiny FLUX embeds guidance: no CFG batch
    # per step: 4 samples × 3 sampler steps sampled; 2 trained steps × 4 rows trained (+ as many reference rows)
    assert state["fb_calls"] == 2 * 2 * 4 * rows_per_forward
    assert state["fwd_calls"] == 2 * (12 + (8 if family != "flux" else 0)) * rows_per_forward


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    extra = ("train.timestep_selection=random", "train.ema_decay=0.9", "loss.kl_beta=0.05")
    for run, steps, resume in (("a", 2, ()), ("a", 4, ("resume=true",)), ("b", 4, ())):
        torch.manual_seed(0)  # the LoRA initialisation, as `prefalign.runs.start_run` seeds it
        grpo.train(tiny_config("shapes-teacher", tmp_path / run, steps, *extra, *resume), tmp_path / run,
                   log=lambda _: None)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 4 and a["fb_calls"] == b["fb_calls"]
    for name, value in a["trainable"].items():
        assert torch.equal(value, b["trainable"][name]), name
    for x, y in zip(a["ema"], b["ema"], strict=True):
        assert torch.equal(x, y)
    rows_a, rows_b = (MetricsLog(tmp_path / d / "metrics.csv").rows for d in "ab")
    assert [r["reward"] for r in rows_a] == [r["reward"] for r in rows_b]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sample.eta=0", "'sample.eta' must be > 0, got 0"),
        ("sample.group_size=1", "'sample.group_size' must be >= 2, got 1"),
        ("reward.advantage=max", "reward.advantage 'max' unknown"),
        ("train.timestep_selection=last", "train.timestep_selection 'last' unknown"),
        ("train.batch_size=3", "train.batch_size=3 must divide the 4 samples per process"),
        ("sample.sde_window_size=5", "sample.sde_window: 5 steps do not fit"),
        ("reward.spec=nosuch-reward", "nosuch-reward"),
    ],
)
def test_bad_values_are_one_line_errors(override, message, tmp_path):
    result = RUNNER.invoke(app, ["align", "--method", "grpo", "--device", "cpu", "--out", str(tmp_path / "run"),
                                 *tiny_overrides("shapes-teacher", 1), override])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]


def test_cli_align_grpo_with_the_shapes_config(tmp_path):
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["align", "--method", "grpo", "--config", str(CONFIGS / "align_grpo_shapes.yaml"),
                                 "--device", "cpu", "--out", str(out), "train.steps=1", "sample.steps=3",
                                 "sample.group_size=2", "sample.prompts_per_step=2", "train.batch_size=4",
                                 "eval.every=1", "eval.num_prompts=2", "eval.steps=2"])
    assert result.exit_code == 0, result.output
    assert "aligned model written to" in result.output and (out / "model" / "model_index.json").is_file()
    assert [r["step"] for r in MetricsLog(out / "eval.csv").rows] == [0, 1]


def test_demo_stage_registers_a_grpo_generator(tmp_path, monkeypatch):
    monkeypatch.setitem(grpo.DEMO_OVERRIDES, "sample", {"steps": 3, "group_size": 2, "prompts_per_step": 1})
    monkeypatch.setitem(grpo.DEMO_OVERRIDES, "train", {"steps": 1, "batch_size": 2, "checkpoint_every": 1})
    config = resolve_config(DEMO_DEFAULTS, None, ["sampler.steps=2"])
    ctx = DemoContext(config, tmp_path, torch.device("cpu"), ["a red circle"], log=lambda _: None)
    grpo.demo_stage(ctx)
    images = ctx.generators["GRPO"](["a red circle", "two blue squares"], [0, 1])
    assert images.shape == (2, 3, 32, 32) and ctx.generators["GRPO"].nfe == 4
    assert ctx.artifacts["grpo"] == tmp_path / "grpo" / "model"


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path, launch):
    """DDP over 2 CPU processes (one prompt group each) takes the same steps as one process with both groups."""
    common = ["align", "--method", "grpo", "--device", "cpu", *tiny_overrides("shapes-teacher", 2)]
    single = RUNNER.invoke(app, [*common, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    launch(["-m", "prefalign.cli", *common, "--out", str(tmp_path / "two")])
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two"))
    assert one["fb_calls"] == two["fb_calls"] and one["fwd_calls"] == two["fwd_calls"]
    rows_one, rows_two = (MetricsLog(tmp_path / d / "metrics.csv").rows for d in ("one", "two"))
    update = torch.cat([v.flatten() for k, v in one["trainable"].items() if "lora_B" in k])
    assert update.abs().mean() > 1e-4
    for name, value in one["trainable"].items():
        assert torch.allclose(value, two["trainable"][name], atol=1e-6, rtol=1e-4), name
    assert rows_one[0]["ratio"] == rows_two[0]["ratio"] == 1.0
