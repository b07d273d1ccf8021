"""Diffusion-DPO: closed-form loss checks, the policy = reference self-test on SD/SDXL/shapes structures, LoRA vs
full, reference via copy vs disabled adapters, data orientation, resume, NaN guard, CLI and the demo stage."""

import math
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.config import resolve_config
from prefalign.demo import DEMO_DEFAULTS, DemoContext
from prefalign.diffusion.schedules import training_target
from prefalign.diffusion.tiny import save_tiny_pipeline, tiny_pipeline
from prefalign.errors import PrefalignError
from prefalign.shapes.labels import make_preference_dataset
from prefalign.shapes.teacher import load_teacher
from prefalign.train import dpo
from prefalign.train.common import MetricsLog
from prefalign.train.policy import Policy

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """24 simulated web-data pairs (with ties) in Pick-a-Pic parquet format."""
    out = tmp_path_factory.mktemp("pairs")
    make_preference_dataset(out, 24, seed=3)
    return str(out / "train.parquet")


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return str(save_tiny_pipeline(tmp_path_factory.mktemp("pixel") / "pipe", "pixel"))


def tiny_overrides(model_dir: str, pairs: str, steps: int, *extra: str) -> list[str]:
    return [f"model={model_dir}", f"data.source={pairs}", f"train.steps={steps}", "train.batch_size=2",
            "train.lr=1e-3", "train.log_every=1", "train.checkpoint_every=2", "eval.every=0", *extra]


def tiny_config(model_dir: str, pairs: str, out, steps: int, *extra: str) -> dict:
    return resolve_config(dpo.DEFAULTS, None, tiny_overrides(model_dir, pairs, steps, *extra), out=str(out),
                          device="cpu")


def test_loss_closed_forms():
    err = torch.tensor([0.3, 0.2, 0.5, 0.1])  # [w1, w2, l1, l2]
    for kind, expected in (("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * 100.0)) ** 2)):
        loss, z = dpo.diffusion_dpo_loss(err, err.clone(), 100.0, kind)
        assert torch.equal(z, torch.zeros(2)) and torch.allclose(loss, torch.full((2,), expected))
    # Policy lowers the winner's error by 0.02 relative to the reference: z = 0.5·0.02 = 0.01, βz = 1.
    reference = torch.tensor([0.3, 0.3, 0.3, 0.3])
    policy = torch.tensor([0.28, 0.28, 0.3, 0.3])
    loss, z = dpo.diffusion_dpo_loss(policy, reference, 100.0)
    assert torch.allclose(z, torch.full((2,), 0.01)) and torch.allclose(loss, torch.full((2,), math.log1p(math.e**-1)))
    assert torch.allclose(dpo.diffusion_dpo_loss(policy, reference, 100.0, "hinge")[0], torch.zeros(2))
    with pytest.raises(PrefalignError, match=r"loss\.type"):
        dpo.diffusion_dpo_loss(policy, reference, 1.0, "kto")


def random_pairs(model, prompts: list[str], seed: int = 0) -> dpo.Pairs:
    g = torch.Generator().manual_seed(seed)
    n = len(prompts)
    return dpo.Pairs(prompts, torch.rand(n, 3, *model.image_size, generator=g),
                     torch.rand(n, 3, *model.image_size, generator=g), torch.randint(1000, (n,), generator=g),
                     torch.randn(n, *model.sample_shape, generator=g))


@pytest.mark.parametrize("family", ["sd", "sdxl", "shapes"])
def test_policy_equal_to_reference_gives_log2_and_zero_margin(family):
    model = load_teacher() if family == "shapes" else tiny_pipeline(family)
    policy = Policy(model, lora_rank=None)
    config = resolve_config(dpo.DEFAULTS, None, ["loss.beta=5000"])
    pairs = random_pairs(model, ["a red circle", "two blue squares"])
    loss, stats = dpo.dpo_step(policy, pairs, config, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["margin"] == 0.0 and stats["implicit_acc"] == 0.5
    loss.backward()  # the gradient of −log σ(βz) at z = 0 is −β/2·∇z: nonzero although the loss is log 2
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_v_target_error_is_epsilon_error_over_alpha_squared():
    model = load_teacher()
    x0, noise = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 3, 32, 32)
    t = torch.tensor([10, 500, 900])
    x_t = model.schedule.add_noise(x0, noise, t)
    alpha, sigma = model.schedule.alpha_sigma(t, like=x0)
    output = training_target(x0, noise, alpha, sigma, "v_prediction") + 0.1 * torch.randn_like(x0)
    native = dpo.prediction_error(output, x_t, x0, noise, t, model, "native")
    epsilon = dpo.prediction_error(output, x_t, x0, noise, t, model, "epsilon")
    assert torch.allclose(epsilon, native * alpha.flatten() ** 2, rtol=1e-4)


def test_lora_and_copy_vs_disabled_adapter_references_agree():
    losses, references = [], []
    for reference in ("copy", "adapter"):
        model = tiny_pipeline("sd")
        torch.manual_seed(0)  # the same LoRA A initialisation for both policies
        policy = Policy(model, lora_rank=4, reference=reference)
        with torch.no_grad():  # move the policy away from the reference: LoRA's B starts at zero
            for name, p in policy.model.denoiser.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        config = resolve_config(dpo.DEFAULTS, None, ["loss.beta=50"])
        loss, _ = dpo.dpo_step(policy, random_pairs(model, ["a cat", "a dog"]), config,
                               torch.Generator().manual_seed(1))
        losses.append(loss.item())
        x_t, t = torch.randn(2, 4, 32, 32), torch.tensor([100, 700])
        cond = policy.model.encode_prompts(["a cat", "a dog"])
        references.append(policy.reference(x_t, t, cond))
        base = tiny_pipeline("sd")(x_t, t, cond)  # the same seed rebuilds the pre-LoRA network
        assert torch.allclose(references[-1], base, atol=1e-5)
        assert not torch.allclose(policy.model(x_t, t, cond), base, atol=1e-3)
        loss.backward()
        trainable = policy.trainable_parameters()
        assert trainable and all("lora" in n for n, p in policy.model.denoiser.named_parameters() if p.requires_grad)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] != pytest.approx(math.log(2))
    assert torch.allclose(references[0], references[1], atol=1e-5)


def test_pairs_drop_ties_and_put_the_winner_first(pairs):
    data = dpo.PairData(pairs, "train", 32, None, log=lambda _: None)
    labels = data.data.label_0.tolist()
    assert len(data.order) == sum(label != 0.5 for label in labels) < len(labels)  # the fixture has ties
    drawn = data.draw(64, load_teacher(), resolve_config(dpo.DEFAULTS), torch.Generator().manual_seed(0))
    assert drawn.t.shape == (64,) and drawn.noise.shape == (64, 3, 32, 32) and "" in drawn.prompts  # dropout 0.2
    for caption, winner, loser in zip(drawn.prompts, drawn.winners, drawn.losers, strict=True):
        if not caption:
            continue
        i = next(i for i, _ in data.order if data.data[i]["caption"] == caption)
        item = data.data[i]
        first, second = (item["image_0"], item["image_1"]) if item["label_0"] == 1 else (item["image_1"], item["image_0"])
        assert torch.equal(winner, first) and torch.equal(loser, second)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_train_on_tiny_sd_and_sdxl_saves_a_loadable_pipeline(family, pairs, tmp_path):
    model_dir = str(save_tiny_pipeline(tmp_path / "base", family))
    config = tiny_config(model_dir, pairs, tmp_path / "run", 2, "policy.lora_rank=4", "policy.reference=adapter",
                         "eval.every=2", "eval.num_prompts=2", "eval.steps=2", "eval.rewards=[shapes-oracle]",
                         "loss.weighting=min_snr", "loss.timesteps.kind=laplace")
    out = dpo.train(config, tmp_path / "run", log=lambda _: None)
    from prefalign.diffusion.models import DiffusionModel

    assert DiffusionModel.from_pretrained(out).family == family
    rows = MetricsLog(tmp_path / "run" / "eval.csv").rows
    assert [r["step"] for r in rows] == [0, 2] and 0 <= rows[-1]["shapes-oracle"] <= 1
    assert rows[-1]["fb_calls"] == rows[-1]["fwd_calls"] == 2 * 2 * 2  # 2 steps × 2 pairs × 2 images
    assert rows[-1]["compute"] == 8 + 3 * 8


def test_resume_reproduces_an_uninterrupted_run_with_sft_warmup_and_ema(pixel_dir, pairs, tmp_path):
    extra = ("train.sft_steps=1", "train.ema_decay=0.9", "train.grad_accum=2")
    dpo.train(tiny_config(pixel_dir, pairs, tmp_path / "a", 2, *extra), tmp_path / "a", log=lambda _: None)
    with pytest.raises(PrefalignError, match="pass --resume"):
        dpo.train(tiny_config(pixel_dir, pairs, tmp_path / "a", 4, *extra), tmp_path / "a", log=lambda _: None)
    dpo.train(tiny_config(pixel_dir, pairs, tmp_path / "a", 4, *extra, "resume=true"), tmp_path / "a",
              log=lambda _: None)
    dpo.train(tiny_config(pixel_dir, pairs, tmp_path / "b", 4, *extra), tmp_path / "b", log=lambda _: None)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 4 and a["fb_calls"] == b["fb_calls"] == 2 * 2 * 1 + 2 * 2 * 3 * 2
    for name, value in a["trainable"].items():
        assert torch.equal(value, b["trainable"][name]), name
    for x, y in zip(a["ema"], b["ema"], strict=True):
        assert torch.equal(x, y)
    rows = MetricsLog(tmp_path / "a" / "metrics.csv").rows
    assert [(r["step"], r["phase"]) for r in rows] == [(1, "sft"), (2, "dpo"), (3, "dpo"), (4, "dpo")]


def test_nan_guard_names_the_step_and_keeps_the_last_checkpoint(pixel_dir, pairs, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = dpo.diffusion_dpo_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, z = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 4 else loss), z

    monkeypatch.setattr(dpo, "diffusion_dpo_loss", poisoned)
    config = tiny_config(pixel_dir, pairs, tmp_path, 5)
    with pytest.raises(PrefalignError, match=r"became nan at step 3; last good checkpoint: .*checkpoint.pt \(step 2\)"):
        dpo.train(config, tmp_path, log=lambda _: None)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_cli_align_dpo_trains_resumes_and_reports_errors_in_one_line(pixel_dir, pairs, tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text(f"model: {pixel_dir}\ndata:\n  source: {pairs}\ntrain:\n  batch_size: 2\n  log_every: 1\n"
                      "eval:\n  every: 0\n")
    out = tmp_path / "run"
    first = RUNNER.invoke(app, ["align", "--method", "dpo", "--config", str(config), "train.steps=1", "--out",
                                str(out), "--device", "cpu"])
    assert first.exit_code == 0, first.output
    assert "aligned model written to" in first.output and (out / "model" / "model_index.json").is_file()
    again = RUNNER.invoke(app, ["align", "--method", "dpo", "--config", str(config), "train.steps=2", "--out",
                                str(out), "--device", "cpu"])
    assert again.exit_code == 2 and "pass --resume" in again.output
    resumed = RUNNER.invoke(app, ["align", "--method", "dpo", "--config", str(config), "train.steps=2", "--out",
                                  str(out), "--device", "cpu", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in MetricsLog(out / "metrics.csv").rows] == [1, 2]
    bad = RUNNER.invoke(app, ["align", "--method", "dpo", "--config", str(config), "loss.type=kto", "--out",
                              str(tmp_path / "bad"), "--device", "cpu"])
    assert bad.exit_code == 2 and "loss.type 'kto' unknown" in bad.output


def test_demo_stage_registers_a_dpo_generator(tmp_path, monkeypatch):
    monkeypatch.setitem(dpo.DEMO_OVERRIDES, "data", {"source": "shapes:web?n=8&seed=1"})
    monkeypatch.setitem(dpo.DEMO_OVERRIDES, "train", {"steps": 1, "batch_size": 2, "checkpoint_every": 1})
    config = resolve_config(DEMO_DEFAULTS, None, ["sampler.steps=2"])
    ctx = DemoContext(config, tmp_path, torch.device("cpu"), ["a red circle"], log=lambda _: None)
    dpo.demo_stage(ctx)
    images = ctx.generators["DPO"](["a red circle", "two blue squares"], [0, 1])
    assert images.shape == (2, 3, 32, 32) and ctx.generators["DPO"].nfe == 4
    assert ctx.artifacts["dpo"] == tmp_path / "dpo" / "model"


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(pixel_dir, pairs, tmp_path, launch):
    """DDP over 2 CPU processes (1 pair each) takes the same steps as one process with 2 pairs."""
    common = ["align", "--method", "dpo", "--device", "cpu", *tiny_overrides(pixel_dir, pairs, 2, "train.prompt_dropout=0.5")]
    single = RUNNER.invoke(app, [*common, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    launch(["-m", "prefalign.cli", *common, "--out", str(tmp_path / "two"), "train.batch_size=1"])
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two"))
    assert one["fb_calls"] == two["fb_calls"] == 2 * 2 * 2
    base = tiny_pipeline("pixel").denoiser.state_dict()
    update_one, update_two = (torch.cat([(s[k] - base[k]).flatten() for k in base]) for s in (one["trainable"],
                                                                                               two["trainable"]))
    # Adam's first steps are ±lr even where a gradient is ~0, so reduction-order noise can flip a few elements.
    assert update_one.abs().mean() > 1e-3
    assert (update_one - update_two).abs().mean() < 1e-2 * update_one.abs().mean()


@pytest.mark.slow
def test_bf16_mixed_precision_run(pixel_dir, pairs, tmp_path):
    """bf16 autocast on CPU (a fresh process: accelerate fixes the precision once per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PREFALIGN_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "prefalign.cli", "align", "--method", "dpo", "--device", "cpu", "--out",
         str(tmp_path), *tiny_overrides(pixel_dir, pairs, 2, "train.mixed_precision=bf16")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = MetricsLog(tmp_path / "metrics.csv").rows
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(rows[1]["loss"])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainable"]
    assert all(v.dtype == torch.float32 for v in state.values())  # fp32 master weights


@pytest.mark.slow
def test_train_on_a_rectified_flow_model(pairs, tmp_path):
    """SD3's structure (rectified flow, velocity target) runs the same loop: logit-normal σ, Min-SNR for flow,
    LoRA with the adapter-disabled reference, Euler sampling in the evaluations."""
    from prefalign.diffusion.models import DiffusionModel

    model_dir = str(save_tiny_pipeline(tmp_path / "base", "sd3", sample_size=8))
    config = tiny_config(model_dir, pairs, tmp_path / "run", 2, "policy.lora_rank=4", "policy.reference=adapter",
                         "eval.every=2", "eval.num_prompts=2", "eval.steps=2", "eval.rewards=[shapes-oracle]",
                         "loss.weighting=min_snr", "loss.timesteps.kind=logit-normal")
    out = dpo.train(config, tmp_path / "run", log=lambda _: None)
    saved, base = DiffusionModel.from_pretrained(out), DiffusionModel.from_pretrained(model_dir)
    assert (saved.family, saved.prediction_type) == ("sd3", "flow_prediction")
    assert any(not torch.equal(p, q) for p, q in zip(saved.denoiser.parameters(), base.denoiser.parameters(),
                                                      strict=True))
    rows = MetricsLog(tmp_path / "run" / "eval.csv").rows
    assert [r["step"] for r in rows] == [0, 2] and 0 <= rows[-1]["shapes-oracle"] <= 1
