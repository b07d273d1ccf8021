"""Diff-Instruct++: the CFG-is-an-implicit-reward identity, surrogate-loss gradients against the analytic
generator gradient, α_rew = 0 (Diff-Instruct), the TA's DSM, training (resume, NaN guard, UNet/PixArt
structures, LoRA), the one-step generator through `prefalign generate` and the bench kind, and the CLI."""

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from prefalign.bench.generators import parse_spec, resolve_generator
from prefalign.cli import app
from prefalign.config import deep_merge
from prefalign.demo import DemoContext
from prefalign.diffusion.models import DiffusionModel
from prefalign.diffusion.one_step import load_generator, one_step_source, one_step_x0
from prefalign.diffusion.schedules import NoiseSchedule, predicted_x0_eps
from prefalign.diffusion.tiny import save_tiny_pipeline, tiny_pipeline
from prefalign.errors import PrefalignError
from prefalign.runs import start_run
from prefalign.train import dipp
from prefalign.train.policy import Policy

runner = CliRunner()
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
# Small enough for a few seconds per run: 8×8 models, batch 2, shapes-clip as the learned reward.
TINY = {"device": "cpu", "data": {"prompts": "shapes-train", "num_prompts": None},
        "train": {"steps": 2, "batch_size": 2, "log_every": 2, "checkpoint_every": 2}, "eval": {"every": 0}}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dipp_pipes")
    return {family: save_tiny_pipeline(root / family, family, seed=3, sample_size=8)
            for family in ("pixel", "sd", "pixart")}


def _config(model_dir, out, **sections) -> dict:
    config = deep_merge(dipp.DEFAULTS, deep_merge(TINY, sections))
    config.update(model=str(model_dir), out=str(out))
    return config


def _run(config: dict):
    resolved, run_dir = start_run(config, None, [])
    return dipp.train(resolved, run_dir, log=lambda _: None), run_dir


def _with_prediction(model: DiffusionModel, prediction_type: str) -> DiffusionModel:
    return DiffusionModel(model.denoiser, model.schedule, prediction_type, list(model.text_encoders),
                          model.tokenizers, model.vae, model.family)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_cfg_reference_score_is_conditional_score_plus_implicit_reward(prediction_type):
    """s̃_ref = s_ref(·|c) + (α_cfg − 1)·∇log p(c|x_t), ∇log p(c|x_t) = s_ref(·|c) − s_ref(·|∅) (float32 rounding)."""
    policy = Policy(_with_prediction(tiny_pipeline("pixel", seed=1, sample_size=8), prediction_type))
    model = policy.model
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, *model.sample_shape, generator=g)
    t = torch.tensor([50, 400, 900])
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts([""])
    alpha, sigma = model.schedule.alpha_sigma(t, like=x_t)

    def score(c):
        return dipp.model_score(policy.reference(x_t, t, c), x_t, alpha, sigma, prediction_type)[0]

    s_cond, s_uncond = score(cond), score(uncond.repeat_interleave(3))
    implicit_reward_grad = s_cond - s_uncond  # ∇_x log p(c | x_t) by Bayes' rule, from the same network
    for scale in (1.0, 3.0, 7.5):
        guided = dipp.reference_score(policy, x_t, t, cond, uncond, scale)[0]
        torch.testing.assert_close(guided, s_cond + (scale - 1) * implicit_reward_grad, rtol=1e-4, atol=1e-4)
    assert implicit_reward_grad.abs().mean() > 1e-3  # the prompt matters, so the identity is not 0 = 0

    # In the generator gradient: CFG'd Diff-Instruct = unguided Diff-Instruct − (α−1)·∇θ of the implicit reward.
    theta = torch.zeros(1, *model.sample_shape, requires_grad=True)
    noise, weight, s_ta = torch.randn(x_t.shape, generator=g), torch.rand(3, 1, 1, 1), torch.randn(x_t.shape, generator=g)

    def grad(loss):
        return torch.autograd.grad(loss, theta)[0]

    def x_t_of(theta):
        return alpha * (x_t + theta) + sigma * noise

    guided = dipp.reference_score(policy, x_t, t, cond, uncond, 3.0)[0]
    with_cfg = grad(dipp.ikl_surrogate(x_t_of(theta), s_ta, guided, weight).sum())
    plain = grad(dipp.ikl_surrogate(x_t_of(theta), s_ta, s_cond, weight).sum())
    reward = grad((weight * implicit_reward_grad * x_t_of(theta)).sum())  # ∇θ ∫w log p(c|x_t) (surrogate)
    torch.testing.assert_close(with_cfg, plain - 2.0 * reward, rtol=1e-4, atol=1e-3)


def test_surrogate_gradients_equal_the_analytic_generator_gradient():
    """Toy generator x_0 = Aθ, quadratic reward: autograd of L_G = analytic
    Aᵀ·mean_b[w_b α_b (s_ψ − s̃_ref)_b − α_rew ∇r(x_0,b)]."""
    g = torch.Generator().manual_seed(1)
    B, D, K = 4, 12, 5
    A = torch.randn(D, K, generator=g, dtype=torch.float64)
    theta = torch.randn(K, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(B, D, generator=g, dtype=torch.float64)
    alpha, sigma = torch.rand(B, 1, generator=g, dtype=torch.float64), torch.rand(B, 1, generator=g, dtype=torch.float64)
    s_ta, s_ref = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    weight, target = torch.rand(B, 1, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    alpha_rew = 2.5

    x0 = (A @ theta).expand(B, D)
    x_t = alpha * x0 + sigma * noise
    reward = -((x0 - target) ** 2).sum(1)
    loss = dipp.generator_loss(dipp.ikl_surrogate(x_t, s_ta, s_ref, weight), reward, alpha_rew)
    autograd = torch.autograd.grad(loss, theta)[0]

    x0_value = (A @ theta).detach()
    per_sample = weight * alpha * (s_ta - s_ref) - alpha_rew * (-2 * (x0_value - target))
    torch.testing.assert_close(autograd, A.T @ per_sample.mean(0))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_weighting_gives_the_diff_instruct_x0_difference(prediction_type):
    """With w(t) = σ²/α², ∂L/∂x_0 = (x̂_0^TA − x̂_0^ref)/B per pixel (Diff-Instruct's `(Dg − Dd)·images` loss);
    `dmd` divides it by mean|x_0 − x̂_0^ref| per sample."""
    g = torch.Generator().manual_seed(2)
    schedule = NoiseSchedule.make("squaredcos_cap_v2")
    t = torch.tensor([30, 500, 970])
    x0 = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    alpha, sigma = schedule.alpha_sigma(t, like=x0)
    out_ta, out_ref = torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.randn(x0.shape, generator=g,
                                                                                          dtype=torch.float64)
    s_ta, x0_ta = dipp.model_score(out_ta, x_t.detach(), alpha, sigma, prediction_type)
    s_ref, x0_ref = dipp.model_score(out_ref, x_t.detach(), alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_ta, predicted_x0_eps(out_ta, x_t.detach(), alpha, sigma, prediction_type)[0])
    for kind in dipp.IKL_WEIGHTINGS:
        weight = dipp.ikl_weight(kind, alpha, sigma, x0.detach(), x0_ref)
        loss = dipp.generator_loss(dipp.ikl_surrogate(x_t, s_ta, s_ref, weight), None, 0.0)
        grad = torch.autograd.grad(loss, x0, retain_graph=True)[0]
        expected = (x0_ta - x0_ref) / 3
        if kind == "dmd":
            expected = expected / (x0.detach() - x0_ref).abs().mean((1, 2, 3), keepdim=True)
        torch.testing.assert_close(grad, expected)
    with pytest.raises(PrefalignError, match="ikl_weighting"):
        dipp.ikl_weight("snr", alpha, sigma, x0, x0_ref)


def test_diff_instruct_has_no_reward_gradient_and_never_loads_the_reward(pipelines, tmp_path, monkeypatch):
    ikl = torch.tensor([1.0, 3.0], requires_grad=True)
    assert dipp.generator_loss(ikl, None, 0.0) == 2.0
    reward = torch.tensor([5.0, 7.0], requires_grad=True)
    dipp.generator_loss(ikl, reward, 2.0).backward()
    assert reward.grad.tolist() == [-1.0, -1.0]  # −α_rew · mean: the only path of the reward gradient

    def no_reward(*args, **kwargs):
        raise AssertionError("Diff-Instruct must not load a reward")

    monkeypatch.setattr(dipp, "load_training_reward", no_reward)
    out, _ = _run(_config(pipelines["pixel"], tmp_path / "di", reward={"alpha": 0.0}, train={"steps": 1}))
    meta = json.loads((out / "one_step.json").read_text())
    assert meta["method"] == "diff-instruct" and meta["alpha_rew"] == 0.0 and meta["t_init"] == 625  # ε-model


def test_ta_dsm_loss_decreases_on_generator_samples():
    """The TA fits a fixed toy 'generator distribution' (two flat colours) by DSM: loss at fixed (t, ε) drops."""
    ta = tiny_pipeline("pixel", seed=2, sample_size=8)
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[0.8, -0.6, -0.6], [-0.6, -0.6, 0.8]])
    x0 = colours[torch.arange(8) % 2][:, :, None, None].expand(8, 3, 8, 8).clone()
    cond = ta.encode_prompts(["a red circle", "a blue circle"] * 4)
    t_eval, noise_eval = torch.randint(1000, (8,), generator=g), torch.randn(x0.shape, generator=g)
    optimizer = torch.optim.Adam(ta.denoiser.parameters(), lr=1e-3, betas=(0.0, 0.999))

    def held_out():
        with torch.no_grad():
            return float(dipp.ta_dsm_loss(ta, x0, cond, t_eval, noise_eval, "uniform"))

    before = held_out()
    for _ in range(40):
        loss = dipp.ta_dsm_loss(ta, x0, cond, torch.randint(1000, (8,), generator=g),
                                torch.randn(x0.shape, generator=g), "uniform")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out() < 0.7 * before


def test_resume_continues_bit_identically_and_logs_metrics(pipelines, tmp_path):
    ema, evals = {"ema_decay": 0.9}, {"every": 2, "num_prompts": 2, "samples_per_prompt": 2}
    # Evaluation draws from its own generators and restores the weights, so the reference run can skip it.
    straight, _ = _run(_config(pipelines["pixel"], tmp_path / "straight", train={"steps": 4, **ema}))
    _run(_config(pipelines["pixel"], tmp_path / "resumed", train={"steps": 2, **ema}, eval=evals))
    with pytest.raises(PrefalignError, match="--resume"):
        _run(_config(pipelines["pixel"], tmp_path / "resumed", train={"steps": 4, **ema}, eval=evals))
    resumed, run_dir = _run({**_config(pipelines["pixel"], tmp_path / "resumed", train={"steps": 4, **ema},
                                       eval=evals), "resume": True})
    a, b = load_generator(straight)[0], load_generator(resumed)[0]
    for (name, p), q in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4"]
    for column in ("loss", "ta_loss", "ikl_grad", "train_reward", "compute"):
        assert column in rows[0].split(",")
    evals_rows = (run_dir / "eval.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in evals_rows[1:]] == ["0", "2", "4"]
    for column in ("shapes-oracle", "shapes-oracle_lo", "shapes-clip", "diversity"):
        assert column in evals_rows[0].split(",")
    assert (run_dir / "metrics.png").stat().st_size > 0 and (run_dir / "eval.png").stat().st_size > 0


def test_killed_run_resumes_to_the_same_metrics(pipelines, tmp_path, kill_on_calls):
    """Killed in step 2, after the step-1 checkpoint, before the step-2 metrics row averages steps 1 and 2."""
    sections = {"train": {"checkpoint_every": 1}, "eval": {"every": 2, "num_prompts": 2, "samples_per_prompt": 1}}
    _run(_config(pipelines["pixel"], tmp_path / "straight", **sections))
    kill_on_calls(dipp, "one_step_x0", {2})
    with pytest.raises(KeyboardInterrupt):
        _run(_config(pipelines["pixel"], tmp_path / "killed", **sections))
    _run({**_config(pipelines["pixel"], tmp_path / "killed", **sections), "resume": True})
    a, b = ((tmp_path / d / "metrics.csv").read_text().splitlines() for d in ("straight", "killed"))
    seconds = a[0].split(",").index("seconds")
    assert [r.split(",")[:seconds] + r.split(",")[seconds + 1:] for r in a] == [
        r.split(",")[:seconds] + r.split(",")[seconds + 1:] for r in b]


def test_keep_best_saves_the_best_evaluation_and_survives_resume(pipelines, tmp_path, monkeypatch):
    """Scripted scores 0.1, 0.5, 0.9, 0.3 at steps 0–3, then 0.2 at step 4 after a resume: the output holds the
    step-2 weights, equal to a plain 2-step run's (evaluation draws nothing from the training stream)."""
    scores = iter([0.1, 0.5, 0.9, 0.3, 0.2])
    monkeypatch.setattr(dipp, "evaluate_one_step", lambda *args, **kwargs: {"shapes-oracle": next(scores)})
    evals = {"every": 1, "num_prompts": 1, "rewards": ["shapes-oracle"], "keep_best": "shapes-oracle"}
    plain, _ = _run(_config(pipelines["pixel"], tmp_path / "plain", train={"steps": 2}))
    _run(_config(pipelines["pixel"], tmp_path / "kept", train={"steps": 3, "checkpoint_every": 1}, eval=evals))
    kept, run_dir = _run({**_config(pipelines["pixel"], tmp_path / "kept", train={"steps": 4, "checkpoint_every": 1},
                                    eval=evals), "resume": True})
    assert json.loads((kept / "best.json").read_text()) == {"step": 2, "shapes-oracle": 0.9}
    assert (kept / "one_step.json").is_file() and not (run_dir / "best.tmp").exists()
    a, b = load_generator(plain)[0], load_generator(kept)[0]
    for (name, p), q in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(PrefalignError, match=r"eval\.keep_best=shapes-clip needs"):
        _run(_config(pipelines["pixel"], tmp_path / "bad", eval={**evals, "keep_best": "shapes-clip"}))


def test_nan_guard_names_the_step(pipelines, tmp_path):
    with pytest.raises(PrefalignError, match=r"became (nan|inf|-inf) at step 0"):
        _run(_config(pipelines["pixel"], tmp_path / "nan", ta={"lr": 1e38}))


@pytest.mark.parametrize(("family", "lora"), [("sd", 4), ("pixart", None)])
def test_latent_unet_and_pixart_structures_train_and_generate(pipelines, tmp_path, family, lora):
    out, _ = _run(_config(pipelines[family], tmp_path / family, generator={"t_init": 500}, policy={"lora_rank": lora},
                          ta={"lora_rank": lora}))
    model, meta = load_generator(out)
    assert meta["t_init"] == 500 and meta["method"] == "dipp" and model.family == family
    assert not any("lora" in name for name in model.denoiser.state_dict())  # LoRA merged into the weights
    images = one_step_source(model, meta["t_init"])(PROMPTS[:2], [0, 1])
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    base = DiffusionModel.from_pretrained(pipelines[family])
    z = torch.randn(1, *base.sample_shape)
    changed = one_step_x0(model, z, model.encode_prompts(PROMPTS[:1]), 500)
    assert not torch.allclose(changed, one_step_x0(base, z, base.encode_prompts(PROMPTS[:1]), 500))


def test_bench_kind_and_one_image_per_seed(pipelines, tmp_path):
    out, run_dir = _run(_config(pipelines["pixel"], tmp_path / "run", train={"steps": 1}))
    for target in (run_dir, out):
        assert parse_spec(str(target))[0] == "one-step"
    generator = resolve_generator(f"one-step:{run_dir}?batch=2")
    assert generator.nfe == 1 and generator.settings["t_init"] == 625 and generator.settings["batch"] == 2
    source = generator.build(torch.device("cpu"))
    together = source(PROMPTS, [5, 6, 7])
    torch.testing.assert_close(source(PROMPTS[1:2], [6]), together[1:2])  # batch-independent per seed
    with pytest.raises(PrefalignError, match="no one-step generator"):
        resolve_generator(f"one-step:{tmp_path}")


def test_cli_align_then_generate(pipelines, tmp_path):
    config_file = tmp_path / "dipp.yaml"
    config_file.write_text(yaml.safe_dump({"model": str(pipelines["pixel"]), **TINY}))
    run_dir = tmp_path / "cli_run"
    result = runner.invoke(app, ["align", "--method", "dipp", "--config", str(config_file), "reward.alpha=0.5",
                                 "reward.spec=0.5*shapes-clip+shapes-clip", "train.steps=1", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    meta = json.loads((run_dir / "generator" / "one_step.json").read_text())
    assert meta["alpha_rew"] == 0.5 and meta["reward"] == "0.5*shapes-clip+shapes-clip"  # a weighted sum trains
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\ntwo blue squares\n")
    generated = runner.invoke(app, ["generate", "--generator", str(run_dir), "--prompts", str(prompts_file),
                                    "--device", "cpu", "--out", str(tmp_path / "images")])
    assert generated.exit_code == 0, generated.output
    assert len(list((tmp_path / "images" / "images").glob("*.png"))) == 2
    assert json.loads((tmp_path / "images" / "generator.json").read_text())["nfe"] == 1


def test_sample_diversity():
    a, b = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    assert dipp.sample_diversity(torch.stack([a, a, a, b]), [0, 0, 1, 1]) == pytest.approx(0.5)  # (0 + 1) / 2
    assert math.isnan(dipp.sample_diversity(torch.stack([a, b]), [0, 1]))


def test_demo_stage_registers_di_pp_and_diff_instruct(pipelines, tmp_path, monkeypatch):
    monkeypatch.setitem(dipp.DEMO_OVERRIDES, "train", {"steps": 2, "batch_size": 2})  # the wiring, not the budget
    config = {"seed": 0, "teacher": str(pipelines["pixel"]), "sampler": {"guidance": 3.0}}
    ctx = DemoContext(config, tmp_path, torch.device("cpu"), PROMPTS, log=lambda _: None)
    dipp.demo_stage(ctx)
    assert set(ctx.generators) == {"DI++", "Diff-Instruct"} and set(ctx.artifacts) == {"dipp", "diff-instruct"}
    assert ctx.generators["DI++"].nfe == 1 and ctx.generators["DI++"](PROMPTS[:1], [0]).shape == (1, 3, 8, 8)
    assert json.loads((ctx.artifacts["diff-instruct"] / "one_step.json").read_text())["method"] == "diff-instruct"
