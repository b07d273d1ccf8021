"""SPO: pool sampling, pair selection, step log-ratios and loss, training (resume, SD1.5/SDXL structures, CLI,
demo), and the same on rectified-flow models (SD3, FLUX, the flow shapes teacher)."""

import math

import pytest
import torch

from prefalign.diffusion.sampling import ddim_step, ddim_timesteps
from prefalign.diffusion.tiny import tiny_pipeline
from prefalign.errors import PrefalignError
from prefalign.train.policy import Policy
from prefalign.train.spo import pair_log_ratios, round_prompt_indices, spo_loss, transition_log_ratio
from prefalign.train.spo_sampling import StepPairs, sample_step_pairs, select_pair

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="module")
def pixel_model():
    return tiny_pipeline("pixel", sample_size=8)


def _pool_run(model, pool_size=3, threshold=0.0, steps=10, timestep_range=(0, 750), seed=0):
    """Run the resampler with a brightness 'preference model', recording every denoiser call."""
    cond = model.encode_prompts(PROMPTS)
    uncond = model.encode_prompts([""] * len(PROMPTS))
    calls = []

    def denoise(x, t):
        calls.append((x.clone(), t.clone()))
        rows = torch.arange(x.shape[0]) % len(PROMPTS)
        return model.guided(x, t, cond.index(rows), uncond.index(rows), 3.0)

    def score(images, t, prompt_index):
        return 20 * images.mean(dim=(1, 2, 3))

    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(len(PROMPTS), *model.sample_shape, generator=g)
    pairs, stats = sample_step_pairs(denoise, model.decode, score, x_T, model.schedule, steps, pool_size, threshold,
                                     timestep_range=timestep_range, generator=g, **model.sampler_kwargs())
    return pairs, stats, calls, denoise


def test_select_pair_hand_case():
    # Pools of k=3 for B=3 samples (columns). softmax(best, worst) gap = tanh((s_best − s_worst)/2).
    scores = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.6, 0.0], [2.0, 0.55, 0.0]])
    win, lose, keep, gap = select_pair(scores, threshold=0.3)
    assert win[:2].tolist() == [2, 1] and lose[:2].tolist() == [1, 0]
    torch.testing.assert_close(gap[:2], torch.tensor([math.tanh(1.0), math.tanh(0.05)]))
    assert keep.tolist() == [True, False, False]  # 0.762 kept; 0.050 and a tie (gap 0) dropped
    assert not select_pair(scores, threshold=0.8)[2].any()


def test_pool_shares_x_t_and_continues_from_a_candidate(pixel_model):
    model = pixel_model
    pairs, stats, calls, denoise = _pool_run(model)
    kw = model.sampler_kwargs()
    steps = ddim_timesteps(10, 1000, kw["spacing"], kw["steps_offset"])  # 901 … 1; branching at 701 … 1
    branch = [t for t in steps if t <= 750]
    B, k = len(PROMPTS), 3
    assert stats.considered == B * len(branch) and len(pairs) == stats.kept > 0
    assert sorted(set(pairs.t.tolist()), reverse=True) == [t for t in branch if t in set(pairs.t.tolist())]
    assert stats.scored == B * k * len(branch)
    # Forwards: x_T, then one per unbranched step, then the k-candidate pools of every branch step but the last.
    assert stats.denoiser_rows == B * (1 + len(steps) - len(branch)) + B * k * (len(branch) - 1)
    pools = {int(t[0]): x.reshape(k, B, *x.shape[1:]) for x, t in calls if x.shape[0] == B * k}
    for i in range(len(pairs)):
        p = pairs.index(slice(i, i + 1))
        with torch.no_grad():
            out = denoise(p.x_t, p.t)
        step = ddim_step(out, p.t, p.prev_t, p.x_t, model.schedule, eta=1.0,
                         prediction_type=kw["prediction_type"], final_alpha_cumprod=kw["final_alpha_cumprod"])
        # Winner and loser are both draws from the Gaussian of the *shared* x_t: standardised residuals ~ N(0, 1).
        for x in (p.x_win, p.x_lose):
            z = (x - step.mean) / step.std
            assert 0.6 < float(z.pow(2).mean()) < 1.6
        assert not torch.equal(p.x_win, p.x_lose)
        if int(p.prev_t) >= 0:  # both are members of the scored pool at t−1
            pool = pools[int(p.prev_t)][:, int(p.prompt)]
            assert any(torch.equal(c, p.x_win[0]) for c in pool) and any(torch.equal(c, p.x_lose[0]) for c in pool)
        if int(p.t) < max(branch):  # x_t itself is a candidate of the previous pool (the random continuation)
            pool = pools[int(p.t)][:, int(p.prompt)]
            assert any(torch.equal(c, p.x_t[0]) for c in pool)


def test_timestep_range_and_deterministic_final_step():
    # The shapes teacher's scheduler sets set_alpha_to_one: its last DDIM step has σ = 0, so it cannot branch.
    model = tiny_pipeline("pixel", sample_size=8)
    model.scheduler_config.update(set_alpha_to_one=True, steps_offset=0)
    pairs, stats, _, _ = _pool_run(model, threshold=-1.0, timestep_range=(200, 600))
    assert set(pairs.t.tolist()) == {600, 500, 400, 300, 200}  # 10 steps: 900 … 0, keep everything (threshold −1)
    pairs, stats, _, _ = _pool_run(model, threshold=-1.0, timestep_range=(0, 1000))
    assert 0 not in pairs.t.tolist() and stats.considered == 3 * 9


def test_transition_log_ratio_matches_ddim_log_probs(pixel_model):
    g = torch.Generator().manual_seed(1)
    x_t, out, ref_out, noise = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(4))
    schedule = pixel_model.schedule
    t, prev_t = torch.tensor([701, 501, 301, 1]), torch.tensor([601, 401, 201, -99])
    sample = ddim_step(out, t, prev_t, x_t, schedule, eta=1.0, noise=noise, final_alpha_cumprod=0.9999)
    ref = ddim_step(ref_out, t, prev_t, x_t, schedule, eta=1.0, prev_sample=sample.prev_sample,
                    final_alpha_cumprod=0.9999)
    expected = sample.log_prob - ref.log_prob
    ours = transition_log_ratio(sample.prev_sample, sample.mean, ref.mean, sample.std, "sum")
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(transition_log_ratio(sample.prev_sample, sample.mean, ref.mean, sample.std),
                               ours / (3 * 8 * 8))


def test_spo_loss_values_and_clamp():
    zero = torch.zeros(3)
    torch.testing.assert_close(spo_loss(zero, zero, beta=10.0), torch.full((3,), math.log(2)))
    lw, ll = torch.tensor([0.02, 0.5], requires_grad=True), torch.tensor([-0.01, 0.0], requires_grad=True)
    expected = -torch.nn.functional.logsigmoid(10 * (lw - ll))
    torch.testing.assert_close(spo_loss(lw, ll, 10.0), expected)
    clamped = spo_loss(lw, ll, 10.0, clamp_eps=0.1)
    torch.testing.assert_close(clamped[1], -torch.nn.functional.logsigmoid(torch.tensor(10 * math.log(1.1))))
    clamped.sum().backward()
    assert lw.grad[0] < 0 and ll.grad[0] > 0  # inside the band: push the winner up, the loser down
    assert lw.grad[1] == 0  # ratio 1.65 is outside [0.9, 1.1]: no gradient (D3PO clamp)


@pytest.mark.parametrize(("lora_rank", "reference"), [(4, "copy"), (4, "adapter"), (None, "copy")])
def test_on_policy_log_ratio_is_zero_and_loss_is_log2(lora_rank, reference):
    model = tiny_pipeline("pixel", sample_size=8)
    policy = Policy(model, lora_rank=lora_rank, reference=reference)
    pairs, _, _, _ = _pool_run(model, threshold=-1.0)
    cond = model.encode_prompts(PROMPTS).index(pairs.prompt)
    uncond = model.encode_prompts([""]).repeat_interleave(len(pairs))
    lr_w, lr_l = pair_log_ratios(policy, pairs, cond, uncond, guidance=3.0, eta=1.0)
    assert torch.equal(lr_w, torch.zeros_like(lr_w)) and torch.equal(lr_l, torch.zeros_like(lr_l))
    loss = spo_loss(lr_w, lr_l, beta=10.0).mean()
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_round_prompt_indices_cover_epochs():
    first = [i for r in range(4) for i in round_prompt_indices(10, r, 5, seed=3)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert first[:10] != first[10:]
    assert round_prompt_indices(10, 1, 5, seed=3) == first[5:10]


def test_step_pairs_index_and_cat():
    pairs = StepPairs(*(torch.arange(4).float().view(4, 1) for _ in range(3)), torch.arange(4), torch.arange(4),
                      torch.arange(4), torch.rand(4))
    both = StepPairs.cat([pairs.index(slice(0, 1)), pairs.index(torch.tensor([3]))])
    assert len(both) == 2 and both.t.tolist() == [0, 3]


# ------------------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    """A time-conditioned shapes-clip scorer (adaLN at its identity initialisation) saved as a step-aware model."""
    from prefalign.rewards.trainable import build_scorer, save_scorer

    folder = tmp_path_factory.mktemp("spm")
    save_scorer(build_scorer("clip", "shapes-clip", time_conditioned=True), folder, {"guidance": 3.0})
    return folder


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Tiny random-weight pipelines of the real SD1.5 / SDXL / pixel structures, saved as pipeline directories."""
    root = tmp_path_factory.mktemp("pipelines")
    for family in ("sd", "sdxl", "pixel"):
        tiny_pipeline(family, sample_size=8).save_pretrained(root / family)
    return root


def _overrides(pipelines, scorer_dir, family="pixel", steps=4, **extra):
    values = {
        "model": str(pipelines / family), "preference.checkpoint": str(scorer_dir), "data.num_prompts": 8,
        "sample.steps": 4, "sample.batch_size": 2, "sample.pool_size": 2, "sample.threshold": -1.0,
        "sample.guidance": 3.0, "train.steps": steps, "train.batch_size": 4, "train.lr": 1e-3,
        "train.checkpoint_every": 1, "eval.every": 1, "eval.num_prompts": 2, "eval.steps": 2, "eval.guidance": 3.0,
        "eval.rewards": "[shapes-oracle]",
        # 4 DDIM steps (751, 501, 251, 1): x_t at 501, 251 and 1 branch; threshold −1 keeps all 2 × 3 pairs a round,
        # trained in two steps of 4 and 2 pairs.
        "sample.timestep_range": "[0,750]",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _train(tmp_path, overrides, resume=False):
    from prefalign.runs import start_run
    from prefalign.train import spo

    config, run_dir = start_run(spo.DEFAULTS, None, overrides, out=str(tmp_path), device="cpu", resume=resume)
    return spo.train(config, run_dir, log=lambda _: None)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_train_on_sd15_and_sdxl_structures(tmp_path, pipelines, scorer_dir, family):
    import pandas as pd

    from prefalign.diffusion.models import DiffusionModel

    out = _train(tmp_path, _overrides(pipelines, scorer_dir, family, steps=2,
                                      **{"train.log_every": 2, "eval.every": 2}))
    saved = DiffusionModel.from_pretrained(out)
    assert saved.family == family
    base = DiffusionModel.from_pretrained(pipelines / family)
    changed = [n for (n, p), q in zip(saved.denoiser.named_parameters(), base.denoiser.parameters(), strict=True)
               if not torch.equal(p, q)]
    assert changed and all(any(k in n for k in ("to_q", "to_k", "to_v", "to_out")) for n in changed)  # LoRA merged
    metrics, evals = pd.read_csv(tmp_path / "metrics.csv"), pd.read_csv(tmp_path / "eval.csv")
    assert metrics["step"].tolist() == [2] and metrics["pairs"].tolist() == [6]
    # Compute: CFG rows; x_T + x_t at 751 + pools at 251 and 1 (2 prompts × k=2); 6 pairs fwd+bwd and reference.
    assert metrics["scored"].tolist() == [2 * 2 * 3] and metrics["fb_calls"].tolist() == [12]
    assert metrics["fwd_calls"].tolist() == [2 * (2 + 2 + 2 * 2 * 2) + 12]
    assert metrics["compute"].tolist() == [24 + 12 + 3 * 12]
    assert evals["step"].tolist() == [0, 2] and evals["compute"].tolist() == [0, 72]
    assert (tmp_path / "eval.png").is_file() and (tmp_path / "metrics.png").is_file()


def test_default_range_branches_16_of_20_sd15_steps():
    """SPO's official SD1.5 grid (20 DDIM steps, steps_offset 1) branches x_t at t ≤ 751: 16 steps."""
    from prefalign.diffusion.sampling import ddim_timesteps
    from prefalign.train import spo

    low, high = spo.DEFAULTS["sample"]["timestep_range"]
    steps = ddim_timesteps(20, 1000, "leading", steps_offset=1)
    assert sum(low <= t <= high for t in steps) == 16 and max(t for t in steps if t <= high) == 751


def test_resume_mid_round_continues_exactly(tmp_path, pipelines, scorer_dir):
    """Stopped after step 1, halfway through round 1: the resumed run trains on the checkpointed rest of it."""
    from prefalign.errors import PrefalignError

    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(straight, _overrides(pipelines, scorer_dir, steps=4))
    _train(split, _overrides(pipelines, scorer_dir, steps=1))
    state = torch.load(split / "checkpoint.pt", weights_only=True)["method"]
    assert state["round"] == 1 and len(state["pairs"]["t"]) == 2 and len(state["prompts"]) == 2
    with pytest.raises(PrefalignError, match="pass --resume"):
        _train(split, _overrides(pipelines, scorer_dir, steps=4))
    _train(split, _overrides(pipelines, scorer_dir, steps=4), resume=True)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["method"]["round"] == b["method"]["round"] == 2
    assert (a["fb_calls"], a["fwd_calls"]) == (b["fb_calls"], b["fwd_calls"]) == (24, 2 * 24 + 24)
    for name, value in a["trainable"].items():
        torch.testing.assert_close(b["trainable"][name], value, rtol=0, atol=0)
    assert (straight / "eval.csv").read_text().count("\n") == (split / "eval.csv").read_text().count("\n") == 6


@pytest.mark.parametrize(("name", "call"), [("round_prompt_indices", 2), ("spo_loss", 2)])
def test_killed_run_resumes_to_the_same_metrics_and_weights(tmp_path, pipelines, scorer_dir, kill_on_calls,
                                                            name, call):
    """Killed while sampling round 2 (step 2) or in the middle of round 1 (step 1), after that step's checkpoint
    and before its metrics were logged (every 2 steps)."""
    from prefalign.train import spo

    every_two = {"train.log_every": 2, "eval.every": 2}
    _train(tmp_path / "straight", _overrides(pipelines, scorer_dir, **every_two))
    kill_on_calls(spo, name, {call})
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "killed", _overrides(pipelines, scorer_dir, **every_two))
    _train(tmp_path / "killed", _overrides(pipelines, scorer_dir, **every_two), resume=True)
    for csv in ("metrics.csv", "eval.csv"):
        a, b = ((tmp_path / d / csv).read_text().splitlines() for d in ("straight", "killed"))
        seconds = a[0].split(",").index("seconds")
        assert [r.split(",")[:seconds] + r.split(",")[seconds + 1:] for r in a] == [
            r.split(",")[:seconds] + r.split(",")[seconds + 1:] for r in b], csv
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "killed"))
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])


def test_nan_guard_names_the_last_checkpoint(tmp_path, pipelines, scorer_dir, monkeypatch):
    from prefalign.errors import PrefalignError
    from prefalign.train import spo

    calls = {"n": 0}
    real = spo.spo_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss  # round 1 is fine (2 steps), then NaN

    monkeypatch.setattr(spo, "spo_loss", poisoned)
    with pytest.raises(PrefalignError, match=r"nan at step 2; .*checkpoint.pt \(step 2\)"):
        _train(tmp_path, _overrides(pipelines, scorer_dir, steps=6, **{"eval.every": 0}))


def test_rounds_without_pairs_stop_with_a_one_line_error(tmp_path, pipelines, scorer_dir):
    from prefalign.errors import PrefalignError

    # A softmax gap never exceeds 1, so no pair is ever kept.
    with pytest.raises(PrefalignError, match=r"no pair kept in 10 sampling rounds in a row; lower sample\.threshold"):
        _train(tmp_path, _overrides(pipelines, scorer_dir, steps=1, **{"sample.threshold": 1.0, "eval.every": 0}))


def test_cli_align_spo(tmp_path, pipelines, scorer_dir):
    from typer.testing import CliRunner

    from prefalign.cli import app

    runner = CliRunner()
    args = ["align", "--method", "spo", "--device", "cpu", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, args + _overrides(pipelines, scorer_dir, steps=1, **{"eval.every": 0}))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    result = runner.invoke(app, ["align", "--method", "spo", "--device", "cpu", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "preference.checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_registry_reward_ranks_the_pools_instead(tmp_path, pipelines, scorer_dir):
    """preference.reward=shapes-oracle: logits are scale · oracle(x̂0), so the kept pairs' gaps follow the scale."""
    import pandas as pd

    from prefalign.train.spo import RewardPreference

    class Constant:
        def score(self, images, prompts):
            return torch.arange(len(images), dtype=torch.float32)

    logits = RewardPreference(Constant(), 20.0).score_x0(torch.zeros(3, 3, 8, 8), torch.tensor([5, 5, 5]), ["a"] * 3)
    assert logits.tolist() == [0.0, 20.0, 40.0]
    overrides = [o for o in _overrides(pipelines, scorer_dir, steps=1, **{"eval.every": 0})
                 if not o.startswith("preference.checkpoint")]
    _train(tmp_path / "run", [*overrides, "preference.reward=shapes-oracle", "preference.scale=5"])
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["pairs"].iloc[0] > 0
    with pytest.raises(PrefalignError, match=r"set one of preference\.checkpoint"):
        _train(tmp_path / "both", [*overrides, "preference.reward=shapes-oracle", f"preference.checkpoint={scorer_dir}"])


def test_demo_stage_registers_an_spo_generator(tmp_path, scorer_dir, monkeypatch):
    from prefalign.config import resolve_config
    from prefalign.demo import DEMO_DEFAULTS, DemoContext
    from prefalign.train import spo

    monkeypatch.setitem(spo.DEMO_OVERRIDES, "sample", {"steps": 2, "guidance": 3.0, "batch_size": 1,
                                                       "threshold": -1.0})
    monkeypatch.setitem(spo.DEMO_OVERRIDES, "train", {"steps": 1, "batch_size": 2, "checkpoint_every": 1})
    ctx = DemoContext(resolve_config(DEMO_DEFAULTS, None, ["sampler.steps=2"]), tmp_path, torch.device("cpu"),
                      ["a red circle"], log=lambda _: None)
    ctx.artifacts["step-aware"] = scorer_dir
    spo.demo_stage(ctx)
    images = ctx.generators["SPO"](["a red circle"], [0])
    assert images.shape == (1, 3, 32, 32) and ctx.generators["SPO"].nfe == 4
    assert ctx.artifacts["spo"] == tmp_path / "spo" / "model"


# ------------------------------------------------------------------------------------------- rectified flow
def _flow_model(family: str):
    """Tiny random-weight rectified-flow models: SD3 / FLUX structures (latents [4, 8, 8]), the shapes teacher's
    UNet with the flow schedule (arch.family=flow, pixels [3, 32, 32]) and an unshifted 8×8 pixel flow model."""
    from prefalign.config import deep_merge
    from prefalign.diffusion.models import DiffusionModel
    from prefalign.diffusion.schedules import FlowSchedule
    from prefalign.shapes.teacher import DEFAULT_ARCH, build_teacher

    if family == "flow-teacher":
        return build_teacher(deep_merge(DEFAULT_ARCH, {
            "family": "flow", "unet": {"block_out_channels": [8, 8, 16, 16], "attention_head_dim": 8},
            "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}}))
    if family == "flow-pixel":
        pixel = tiny_pipeline("pixel", sample_size=8)
        return DiffusionModel(pixel.denoiser, FlowSchedule(), "flow_prediction", list(pixel.text_encoders),
                              pixel.tokenizers)
    return tiny_pipeline(family, sample_size=8)


def test_flow_pool_shares_x_t_and_branches_the_final_step():
    """Flow-GRPO's SDE step (η = noise level 0.7) on an unshifted 10-step grid t = σ·T = 1000, 889, …, 112, 1: the
    range [0, 750] branches x_t at 667 … 1, including the last step to σ = 0 (its std is not zero)."""
    from prefalign.diffusion.generate import timestep_pairs, transition

    model = _flow_model("flow-pixel")
    kw = model.sampler_kwargs()
    grid = timestep_pairs(model.schedule, 10, **kw)
    branch = [t for t, _ in grid if t <= 750]
    assert len(branch) == 7 and grid[-1][1] == 0
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts([""] * len(PROMPTS))

    def denoise(x, t):
        rows = torch.arange(x.shape[0]) % len(PROMPTS)
        return model.guided(x, t, cond.index(rows), uncond.index(rows), 3.0)

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(len(PROMPTS), *model.sample_shape, generator=g)
    pairs, stats = sample_step_pairs(denoise, model.decode, lambda images, t, i: 20 * images.mean(dim=(1, 2, 3)),
                                     x_T, model.schedule, 10, 3, -1.0, eta=0.7, timestep_range=(0, 750),
                                     generator=g, **kw)
    B, k = len(PROMPTS), 3
    assert pairs.t.dtype == torch.float32 and sorted(set(pairs.t.tolist()), reverse=True) == branch
    assert len(pairs) == stats.considered == B * 7 and 0.0 in pairs.prev_t.tolist()
    assert stats.denoiser_rows == B * (1 + 3) + B * k * (7 - 1)
    with torch.no_grad():
        step = transition(model.schedule, denoise(pairs.x_t, pairs.t), pairs.t, pairs.prev_t, pairs.x_t, 0.7, **kw)
    for x in (pairs.x_win, pairs.x_lose):  # draws from the flow SDE's Gaussian of the shared x_t
        assert 0.6 < float(((x - step.mean) / step.std).pow(2).mean()) < 1.6


def test_flow_default_range_branches_15_of_20_unshifted_steps():
    """t = σ·T ≤ 751 on FlowMatchEulerDiscreteScheduler's unshifted 20-step grid (σ = 1 … 0.001): 737 … 1."""
    from prefalign.diffusion.generate import timestep_pairs
    from prefalign.diffusion.schedules import FlowSchedule
    from prefalign.train import spo

    low, high = spo.DEFAULTS["sample"]["timestep_range"]
    assert sum(low <= t <= high for t, _ in timestep_pairs(FlowSchedule(), 20)) == 15


def test_transition_log_ratio_matches_flow_log_probs():
    from prefalign.diffusion.generate import transition
    from prefalign.diffusion.schedules import FlowSchedule

    g = torch.Generator().manual_seed(1)
    x_t, out, ref_out = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t, prev_t = torch.tensor([750.0, 400.0, 100.0]), torch.tensor([600.0, 300.0, 0.0])
    sample = transition(FlowSchedule(shift=3.0), out, t, prev_t, x_t, 0.7, generator=g)
    ref = transition(FlowSchedule(shift=3.0), ref_out, t, prev_t, x_t, 0.7, prev_sample=sample.prev_sample)
    ours = transition_log_ratio(sample.prev_sample, sample.mean, ref.mean, sample.std, "sum")
    torch.testing.assert_close(ours, sample.log_prob - ref.log_prob, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("family", ["flow-pixel", "sd3"])
def test_on_policy_flow_log_ratio_is_zero(family):
    model = _flow_model(family)
    policy = Policy(model, lora_rank=4, reference="adapter")
    pairs, _, _, _ = _pool_run(model, pool_size=2, threshold=-1.0, steps=4)
    assert len(pairs) > 0 and pairs.t.is_floating_point()
    cond = model.encode_prompts(PROMPTS).index(pairs.prompt)
    uncond = model.encode_prompts([""]).repeat_interleave(len(pairs))
    lr_w, lr_l = pair_log_ratios(policy, pairs, cond, uncond, guidance=3.0, eta=1.0)
    assert torch.equal(lr_w, torch.zeros_like(lr_w)) and torch.equal(lr_l, torch.zeros_like(lr_l))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux", "flow-teacher"])
def test_train_two_lora_steps_on_flow_models(tmp_path, scorer_dir, monkeypatch, family):
    """Two optimizer steps of LoRA SPO through the loop; every step's LoRA gradients are finite, lora_B's non-zero
    from the first step (B = 0 at the start zeroes lora_A's) and lora_A's from the second."""
    import pandas as pd

    from prefalign.train import loop

    model = _flow_model(family)  # in memory: a reloaded FLUX takes FluxPipeline's 128 default size
    monkeypatch.setattr(loop, "load_base_model", lambda spec, device: model)
    grads, real = [], loop.make_optimizer

    def recording(params, train, lr=None):
        optimizer, names = real(params, train, lr), {id(p): n for n, p in model.denoiser.named_parameters()}
        step = optimizer.step

        def recorded(*args, **kwargs):
            grads.append({names[id(p)]: p.grad.clone() for p in params if p.grad is not None})
            return step(*args, **kwargs)

        optimizer.step = recorded
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", recording)
    overrides = {"model": family, "preference.checkpoint": str(scorer_dir), "data.num_prompts": 4,
                 "policy.lora_rank": 4, "sample.steps": 4, "sample.eta": 0.7, "sample.batch_size": 2,
                 "sample.pool_size": 2, "sample.threshold": -1.0, "sample.guidance": 3.0, "train.steps": 2,
                 "train.batch_size": 2, "train.lr": 1e-3, "train.log_every": 1, "eval.every": 0}
    _train(tmp_path, [f"{k}={v}" for k, v in overrides.items()])
    assert len(grads) == 2 and all("lora_" in name for g in grads for name in g)
    assert all(torch.isfinite(v).all() for g in grads for v in g.values())
    nonzero = [{name.split("lora_")[1][0] for name, v in g.items() if v.abs().sum() > 0} for g in grads]
    assert nonzero == [{"B"}, {"A", "B"}]
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["step"].tolist() == [1, 2] and metrics["loss"].notna().all() and metrics["pairs"].iloc[0] > 0
