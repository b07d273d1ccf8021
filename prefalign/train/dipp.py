"""Diff-Instruct++ (Luo 2024, arXiv 2410.18881, Algorithm 1): align a one-step generator with a reward while an
Integral KL term keeps it close to the CFG'd reference diffusion model. Diff-Instruct (Luo et al. 2023) is the
case α_rew = 0. Derivation, equations and why the stop-gradient surrogates have the right gradients:
docs/dipp.md. No official DI++ code exists; conventions follow the official Diff-Instruct code
(pkulwj1994/diff_instruct `training/di_loss.py`): TA update first, then the generator; Adam β = (0, 0.999).

One iteration, prompts c, z ~ N(0, I):
1. x_0 = g_θ(z, c) (prefalign/diffusion/one_step.py).
2. K_TA rounds of denoising score matching of the TA s_ψ on sg[x_0] (weighting λ(t)).
3. t ~ π(t) = U{t_min..t_max}, x_t = α_t x_0 + σ_t ε, and the generator loss
   L_G = −α_rew·r(x_0, c) + w(t)·sg[s_ψ(x_t, t, c) − s̃_ref(x_t, t, c)]ᵀ x_t,
   s̃_ref = s_ref(·|∅) + α_cfg·(s_ref(·|c) − s_ref(·|∅)) the classifier-free guided reference score.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from prefalign.config import deep_merge
from prefalign.diffusion.conversions import predicted_x0_eps, score_from_eps
from prefalign.diffusion.losses import denoising_loss
from prefalign.diffusion.models import Conditioning, DiffusionModel
from prefalign.diffusion.one_step import (
    GENERATOR_DIR,
    load_generator,
    one_step_source,
    one_step_x0,
    write_meta,
)
from prefalign.errors import PrefalignError
from prefalign.progress import track
from prefalign.rewards.registry import load as load_reward
from prefalign.train.common import (
    EMA,
    Checkpoint,
    MetricsLog,
    check_finite,
    load_prompts,
    lr_at,
    make_accelerator,
    plot_metrics,
    reward_table,
)
from prefalign.train.policy import DEFAULT_LORA_TARGETS, Policy, load_base_model

IKL_WEIGHTINGS = ("x0", "dmd")
DEFAULTS: dict = {
    "seed": 0,
    "device": "auto",
    "out": None,
    "resume": False,
    "log": {"with": None, "project": None},  # experiment tracker: tensorboard | wandb (train.common.make_accelerator)
    "model": None,  # reference diffusion model: None / "shapes-teacher[:DIR]" / a diffusers pipeline directory
    "prompts": "shapes-train",  # shapes-train / shapes-val / a prompt file
    # α_rew = reward.alpha (0: Diff-Instruct; the reward is then never loaded). spec: any registry reward or
    # weighted sum, e.g. "shapes-clip", "trained" with checkpoints {trained: DIR}, "0.5*hpsv2.1+aesthetic".
    "reward": {"spec": "shapes-clip", "alpha": 1.0, "checkpoints": {}},
    "guidance": 3.0,  # α_cfg of the reference score s̃_ref
    # t_init None: T − 1 for v/x0-prediction (x̂_0 stays bounded), 625 for ε-prediction, whose x̂_0 = (x − σε̂)/α
    # explodes near T (SiD-LSG's SD1.5 setting). ema_decay: evaluate and save an EMA of the generator weights
    # (Diff-Instruct keeps one); None: off.
    "generator": {"t_init": None, "lr": 2e-4, "ema_decay": None, "lora_rank": None, "lora_alpha": None,
                  "lora_targets": list(DEFAULT_LORA_TARGETS)},
    # The teaching assistant s_ψ: initialised from the reference, K_TA = updates DSM steps per generator step.
    # A TA learning rate above the generator's (two time-scale updates, as DMD2's 5 TA steps per generator step)
    # keeps s_ψ tracking the generator; with equal rates the shapes generator collapsed onto one colour.
    "ta": {"updates": 1, "lr": 1e-3, "weighting": "uniform", "lora_rank": None, "lora_alpha": None},
    "train": {
        "steps": 300, "batch_size": 8, "lr_schedule": "constant", "warmup_steps": 0, "adam_betas": [0.0, 0.999],
        "grad_clip": 1.0, "t_min": 20, "t_max": 980,  # π(t) = U{t_min..t_max}
        "ikl_weighting": "dmd",  # w(t): x0 (Diff-Instruct code) or dmd (x0 normalised per sample, as DMD)
        "mixed_precision": "no", "grad_accum": 1,
    },
    "eval": {"every": 100, "prompts": "shapes-val", "num_prompts": 32, "samples_per_prompt": 2, "seed": 1234,
             "rewards": ["shapes-oracle"]},  # the training reward is always evaluated too
    "checkpoint_every": 100,
    "save_dtype": None,  # e.g. float16 for the saved generator
}


def model_score(
    output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, x̂_0) of a network output: ∇ log p_t(x_t) ≈ −ε̂/σ_t = (α_t x̂_0 − x_t)/σ_t² (Tweedie's formula;
    docs/dipp.md Eq. 2), for ε-, v- or x_0-prediction."""
    x0_hat, eps_hat = predicted_x0_eps(output.to(x_t.dtype), x_t, alpha, sigma, prediction_type)
    return score_from_eps(eps_hat, sigma), x0_hat


def ikl_weight(kind: str, alpha: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, x0_ref: torch.Tensor
               ) -> torch.Tensor:
    """w(t), shaped [B, 1, …]. `x0`: σ²/α², so that ∂L/∂x_0 = x̂_0^TA − x̂_0^ref (Diff-Instruct's EDM weight σ²).
    `dmd`: that divided by mean|x_0 − x̂_0^ref| per sample (DMD's weight, Yin et al. 2024; SiD-LSG's
    weight_factor), which equalises the gradient scale across t."""
    weight = sigma**2 / alpha**2
    if kind == "x0":
        return weight
    if kind == "dmd":
        return weight / (x0 - x0_ref).abs().flatten(1).mean(1).clamp_min(1e-5).reshape(weight.shape)
    raise PrefalignError(f"train.ikl_weighting '{kind}' unknown; use one of {', '.join(IKL_WEIGHTINGS)}")


def ikl_surrogate(x_t: torch.Tensor, score_ta: torch.Tensor, score_ref: torch.Tensor, weight: torch.Tensor
                  ) -> torch.Tensor:
    """w(t)·sg[s_ψ − s̃_ref]ᵀ x_t per sample, [B]; its θ-gradient is the IKL gradient w(t)(s_ψ − s̃_ref)ᵀ ∂x_t/∂θ
    (Diff-Instruct's IKL gradient; docs/dipp.md §3–4)."""
    return (weight * (score_ta - score_ref).detach() * x_t).flatten(1).sum(1)


def generator_loss(ikl: torch.Tensor, reward: torch.Tensor | None, alpha_rew: float) -> torch.Tensor:
    """L_G = E[w·sg[Δs]ᵀx_t] − α_rew·E[r(x_0, c)] (DI++ objective; docs/dipp.md Eq. 9). `reward` is None when
    α_rew = 0: Diff-Instruct, no reward gradient at all."""
    if reward is None:
        return ikl.mean()
    return ikl.mean() - alpha_rew * reward.float().mean()


def reference_score(policy: Policy, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                    guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s̃_ref, x̂_0^ref) of the frozen reference with CFG at scale α_cfg. By Bayes, s̃_ref = s_ref(·|c) +
    (α_cfg − 1)·∇ log p(c | x_t) with ∇ log p(c | x_t) = s_ref(·|c) − s_ref(·|∅): CFG adds an implicit reward."""
    alpha, sigma = policy.model.schedule.alpha_sigma(t, like=x_t)
    output = policy.reference_guided(x_t, t, cond, uncond, guidance)
    return model_score(output, x_t, alpha, sigma, policy.model.prediction_type)


def ta_dsm_loss(ta: DiffusionModel, x0: torch.Tensor, cond: Conditioning, t: torch.Tensor, noise: torch.Tensor,
                weighting: str) -> torch.Tensor:
    """Denoising score matching (Vincent 2011) of the TA on stop-gradient generator samples, weighted by λ(t)
    (`prefalign.diffusion.losses.denoising_loss`: uniform | snr | min_snr in the network's parameterisation)."""
    x0 = x0.detach()
    x_t = ta.schedule.add_noise(x0, noise, t)
    return denoising_loss(ta(x_t, t, cond), x0, noise, t, ta.schedule, ta.prediction_type, weighting).mean()


def sample_diversity(images: torch.Tensor, groups: Sequence[int]) -> float:
    """Mean over prompts of the mean pairwise RMS pixel distance between that prompt's samples ([0, 1] pixels)."""
    groups_t = torch.as_tensor(list(groups))
    per_prompt = []
    for g in groups_t.unique():
        flat = images[groups_t == g].flatten(1).float()
        if len(flat) > 1:
            dist = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
            per_prompt.append(float(dist.sum() / (len(flat) * (len(flat) - 1))))
    return sum(per_prompt) / len(per_prompt) if per_prompt else float("nan")


@contextlib.contextmanager
def _evaluation_view(policy: Policy, accelerator, ema: EMA | None) -> Iterator[DiffusionModel]:
    """The policy's model with its bare denoiser (no DDP wrapper) in eval mode, holding the EMA weights when there
    is an EMA; everything is restored on exit."""
    wrapped, params = policy.model.denoiser, policy.trainable_parameters()
    backup = [p.detach().clone() for p in params] if ema is not None else []
    policy.model.denoiser = accelerator.unwrap_model(wrapped)
    try:
        if ema is not None:
            ema.copy_to(params)
        yield policy.model.eval()
    finally:
        with torch.no_grad():
            for p, b in zip(params if ema is not None else [], backup, strict=True):
                p.copy_(b)
        policy.model.denoiser = wrapped
        policy.model.train()


def evaluate(model: DiffusionModel, t_init: int, prompts: Sequence[str], samples: int, seed: int,
             rewards: dict) -> dict[str, float]:
    """One-step samples of each eval prompt: every reward's mean and 95 % bootstrap CI over prompts, diversity."""
    batch = [p for p in prompts for _ in range(samples)]
    groups = [i for i in range(len(prompts)) for _ in range(samples)]
    images = one_step_source(model, t_init)(batch, [seed * 1_000_003 + i for i in range(len(batch))])
    return {**reward_table(images, batch, rewards, groups), "diversity": sample_diversity(images, groups)}


def _initial_timestep(config: dict, model: DiffusionModel) -> int:
    """generator.t_init, or its default for the model's parameterisation (see DEFAULTS)."""
    t_init = config["generator"]["t_init"]
    if t_init is None:
        return 625 if model.prediction_type == "epsilon" else model.schedule.num_timesteps - 1
    return int(t_init)


def _check(config: dict, t_init: int, num_timesteps: int) -> None:
    train, T = config["train"], num_timesteps
    if train["ikl_weighting"] not in IKL_WEIGHTINGS:
        raise PrefalignError(f"train.ikl_weighting '{train['ikl_weighting']}' unknown; use x0 or dmd")
    if not 0 < train["t_min"] <= train["t_max"] < T or not 0 < t_init < T:
        raise PrefalignError(f"need 0 < train.t_min ≤ train.t_max < {T} and 0 < generator.t_init < {T} (the "
                             "model's timesteps)")
    if int(train.get("grad_accum", 1)) != 1:
        raise PrefalignError("train.grad_accum must be 1 for dipp (the TA and the generator update in turn each "
                             "iteration); raise train.batch_size or use more processes instead")
    if config["ta"]["updates"] < 1:
        raise PrefalignError("ta.updates (K_TA) must be at least 1")


def train(config: dict, run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Train a DI++ (or, with reward.alpha = 0, Diff-Instruct) one-step generator; resumes from
    run_dir/checkpoint.pt with `resume`. Writes metrics.csv/.png and returns run_dir/generator."""
    tr, gen_cfg, ta_cfg, ev = config["train"], config["generator"], config["ta"], config["eval"]
    accelerator = make_accelerator(config)
    device, say = accelerator.device, (log if accelerator.is_main_process else (lambda _: None))
    checkpoint = Checkpoint(run_dir, bool(config["resume"]))
    state = checkpoint.load()  # first: an existing run without --resume fails before any model loads
    base = load_base_model(config["model"], device)
    t_init = _initial_timestep(config, base)
    _check(config, t_init, base.schedule.num_timesteps)
    ta_model = copy.deepcopy(base)  # s_ψ starts as the reference score (Diff-Instruct initialises Sg = teacher)
    gen = Policy(base, gen_cfg["lora_rank"], gen_cfg["lora_alpha"], gen_cfg["lora_targets"],
                 reference="adapter" if gen_cfg["lora_rank"] else "copy")
    ta = Policy(ta_model, ta_cfg["lora_rank"], ta_cfg["lora_alpha"], reference="none")  # s_ψ needs no reference
    betas = tuple(tr["adam_betas"])
    gen_opt = gen.prepare(accelerator, torch.optim.Adam(gen.trainable_parameters(), gen_cfg["lr"], betas=betas))
    ta_opt = ta.prepare(accelerator, torch.optim.Adam(ta.trainable_parameters(), ta_cfg["lr"], betas=betas))
    ema = EMA(gen.trainable_parameters(), gen_cfg["ema_decay"]) if gen_cfg.get("ema_decay") else None

    alpha_rew, reward_spec = float(config["reward"]["alpha"]), config["reward"]["spec"]
    checkpoints = config["reward"].get("checkpoints") or None
    reward = load_reward(reward_spec, checkpoints, device).requires_grad_(False) if alpha_rew else None
    prompts = load_prompts(config["prompts"])
    uncond = base.encode_prompts([""])
    steps, batch_size = int(tr["steps"]), int(tr["batch_size"])

    metrics = MetricsLog(run_dir / "metrics.csv", accelerator.is_main_process)
    start = 0
    if state is not None:
        gen.load_trainable_state(state["generator"])
        ta.load_trainable_state(state["ta"])
        gen_opt.load_state_dict(state["generator_optimizer"])
        ta_opt.load_state_dict(state["ta_optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = int(state["step"])
        metrics.truncate(start)
        say(f"[dipp] resumed from {checkpoint.path} at step {start}")
    eval_prompts = load_prompts(ev["prompts"], ev["num_prompts"]) if ev["every"] else []
    eval_rewards: dict = {}
    if eval_prompts and accelerator.is_main_process:
        for spec in dict.fromkeys([*ev["rewards"], reward_spec]):
            eval_rewards[spec] = load_reward(spec, checkpoints, device)

    running: dict[str, list[float]] = {"ta_loss": [], "ikl_grad": [], "train_reward": []}
    if state is not None:  # values since the last metrics row, so a resumed run logs the same means
        running.update(state.get("running", {}))
    clock = time.perf_counter() - float(metrics.rows[-1].get("seconds", 0.0) if metrics.rows else 0.0)
    gen.model.train()
    ta.model.train()
    for step in track(range(start, steps), "DI++ generator", total=steps - start):
        # Every random draw is a function of (seed, rank, step), so a resumed run continues identically.
        g = torch.Generator().manual_seed(int(config["seed"]) * 1_000_003 + accelerator.process_index * 7919 + step)
        batch = [prompts[i] for i in torch.randint(len(prompts), (batch_size,), generator=g).tolist()]
        shape = (batch_size, *base.sample_shape)
        z = torch.randn(shape, generator=g).to(device)
        for opt, lr in ((gen_opt, gen_cfg["lr"]), (ta_opt, ta_cfg["lr"])):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, tr["warmup_steps"], steps, tr["lr_schedule"])
        cond = base.encode_prompts(batch)
        with accelerator.autocast():
            x0 = one_step_x0(gen.model, z, cond, t_init)  # g_θ(z, c), kept with its graph for step 3
        for _ in range(int(ta_cfg["updates"])):  # 2. K_TA DSM updates of s_ψ on sg[x_0]
            t_ta = torch.randint(base.schedule.num_timesteps, (batch_size,), generator=g).to(device)
            noise = torch.randn(shape, generator=g).to(device)
            with accelerator.autocast():
                ta_loss = ta_dsm_loss(ta.model, x0, cond, t_ta, noise, ta_cfg["weighting"])
            check_finite(ta_loss, step, checkpoint)
            accelerator.backward(ta_loss)
            accelerator.clip_grad_norm_(ta.trainable_parameters(), tr["grad_clip"])
            ta_opt.step()
            ta_opt.zero_grad(set_to_none=True)
            running["ta_loss"].append(float(ta_loss.detach()))
        # 3. the generator: IKL gradient through x_t, reward gradient through x_0.
        t = torch.randint(int(tr["t_min"]), int(tr["t_max"]) + 1, (batch_size,), generator=g).to(device)
        x_t = base.schedule.add_noise(x0, torch.randn(shape, generator=g).to(device), t)
        alpha, sigma = base.schedule.alpha_sigma(t, like=x_t)
        with accelerator.autocast():
            with torch.no_grad():
                score_ta = model_score(ta.model(x_t.detach(), t, cond), x_t.detach(), alpha, sigma,
                                       base.prediction_type)[0]
                score_ref, x0_ref = reference_score(gen, x_t.detach(), t, cond, uncond, config["guidance"])
                weight = ikl_weight(tr["ikl_weighting"], alpha, sigma, x0.detach(), x0_ref)
            ikl = ikl_surrogate(x_t, score_ta, score_ref, weight)
            rewards = reward.differentiable(base.decode(x0), batch) if reward is not None else None
            loss = generator_loss(ikl, rewards, alpha_rew)
        check_finite(loss, step, checkpoint)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(gen.trainable_parameters(), tr["grad_clip"])
        gen_opt.step()
        gen_opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(step)
        running["ikl_grad"].append(float((weight * alpha * (score_ta - score_ref)).abs().mean()))
        if rewards is not None:
            running["train_reward"].append(float(rewards.detach().mean()))

        done = step + 1
        if ev["every"] and (done % ev["every"] == 0 or done == steps):
            row = {"step": done, **{k: sum(v) / len(v) for k, v in running.items() if v},
                   "seconds": time.perf_counter() - clock}
            running = {k: [] for k in running}
            if accelerator.is_main_process:
                with _evaluation_view(gen, accelerator, ema) as model:
                    row |= evaluate(model, t_init, eval_prompts, ev["samples_per_prompt"], ev["seed"], eval_rewards)
                metrics.append(row)
                plot_metrics(metrics.path, run_dir / "metrics.png", [*eval_rewards, "diversity", "ikl_grad"],
                             title=f"DI++ (α_rew = {alpha_rew:g}, α_cfg = {config['guidance']:g})")
                say(f"[dipp] step {done}: " + ", ".join(f"{k} {row[k]:.4g}" for k in [*eval_rewards, "diversity"]))
            accelerator.wait_for_everyone()
        if done % config["checkpoint_every"] == 0 or done == steps:
            state = {"step": done, "generator": gen.trainable_state(), "ta": ta.trainable_state(),
                     "generator_optimizer": gen_opt.state_dict(), "ta_optimizer": ta_opt.state_dict(), "running": running}
            checkpoint.save(state | ({"ema": ema.state_dict()} if ema is not None else {}), accelerator)

    out_dir = run_dir / GENERATOR_DIR
    if accelerator.is_main_process:
        dtype = getattr(torch, config["save_dtype"]) if config.get("save_dtype") else None
        with _evaluation_view(gen, accelerator, ema):
            gen.save_pretrained(out_dir, dtype)
        write_meta(out_dir, t_init, {"method": "dipp" if alpha_rew else "diff-instruct", "reward": reward_spec,
                                     "alpha_rew": alpha_rew, "alpha_cfg": config["guidance"], "steps": steps})
    accelerator.wait_for_everyone()
    say(f"[dipp] one-step generator written to {out_dir}")
    return out_dir


DEMO_OVERRIDES: dict = {
    "resume": True, "checkpoint_every": 1000,
    "train": {"steps": 30, "batch_size": 8},
    "eval": {"every": 0},
}


def demo_stage(ctx) -> None:
    """`prefalign demo` stage `dipp`: DI++ (α_rew = 1, reward shapes-clip) and Diff-Instruct (α_rew = 0) one-step
    generators distilled from the demo's teacher for a few dozen steps, in `dipp/`; registers generators "DI++" /
    "Diff-Instruct" and sets ctx.artifacts["dipp"] / ["diff-instruct"] to their generator directories."""
    for name, key, alpha in (("DI++", "dipp", 1.0), ("Diff-Instruct", "diff-instruct", 0.0)):
        config = deep_merge(DEFAULTS, {**DEMO_OVERRIDES, "seed": ctx.config["seed"], "device": str(ctx.device),
                                       "model": ctx.config["teacher"], "guidance": ctx.config["sampler"]["guidance"],
                                       "reward": {"alpha": alpha}})
        run_dir = ctx.run_dir / "dipp" / ("dipp" if alpha else "diff_instruct")
        run_dir.mkdir(parents=True, exist_ok=True)
        out = train(config, run_dir, ctx.log)
        model, meta = load_generator(out, ctx.device)
        ctx.generators[name] = one_step_source(model, meta["t_init"])
        ctx.artifacts[key] = out
