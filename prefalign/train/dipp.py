"""Diff-Instruct++ (Luo 2024, arXiv 2410.18881, Algorithm 1): align a one-step generator with a reward while an
Integral KL term keeps it close to the CFG'd reference diffusion model. Diff-Instruct (Luo et al. 2023) is the
case α_rew = 0. Derivation, equations and why the stop-gradient surrogates have the right gradients:
docs/dipp.md. No official DI++ code exists; conventions follow the official Diff-Instruct code
(pkulwj1994/diff_instruct `training/di_loss.py`): TA update first, then the generator; Adam β = (0, 0.999).

One iteration, prompts c, z ~ N(0, I):
1. x_0 = g_θ(z, c) (prefalign/diffusion/one_step.py).
2. K_TA rounds of denoising score matching of the TA s_ψ on sg[x_0] (weighting λ(t)).
3. t ~ π(t) = U{t_min..t_max} (entries of the schedule's training table), x_t = α_t x_0 + σ_t ε, and
   L_G = −α_rew·r(x_0, c) + w(t)·sg[s_ψ(x_t, t, c) − s̃_ref(x_t, t, c)]ᵀ x_t,
   s̃_ref = s_ref(·|∅) + α_cfg·(s_ref(·|c) − s_ref(·|∅)) the classifier-free guided reference score.

Both families: every score is −ε̂/σ of the network output through `prefalign.diffusion.conversions` (for rectified
flow, x_σ = (1 − σ)x_0 + σε with velocity v: −(x_σ + (1 − σ)v)/σ), timesteps live on the schedule's own axis
(VP integers, flow t = σ·T), and the one-step generator starts at the top of the table (flow: σ = 1, pure noise).
The generator update is the training loop's optimizer step (`prefalign.train.loop`); the TA and its Adam state
are the method's own state, checkpointed beside the generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from prefalign.config import deep_merge
from prefalign.diffusion.conversions import predicted_x0_eps, score_from_eps
from prefalign.diffusion.losses import denoising_loss
from prefalign.diffusion.models import Conditioning, DiffusionModel
from prefalign.diffusion.one_step import (
    GENERATOR_DIR,
    initial_timestep,
    load_generator,
    one_step_source,
    one_step_x0,
    write_meta,
)
from prefalign.diffusion.schedules import Schedule
from prefalign.errors import PrefalignError
from prefalign.train.common import load_prompts, load_training_reward, lr_at, reward_table, run_defaults
from prefalign.train.loop import Method, MicroBatch, Run, make_optimizer, train_policy
from prefalign.train.policy import DEFAULT_LORA_TARGETS, Policy

IKL_WEIGHTINGS = ("x0", "dmd")
DEFAULTS: dict = {
    **run_defaults(),
    "model": None,  # reference diffusion model: None / "shapes-teacher[:DIR]" / a diffusers pipeline directory
    "data": {"prompts": "shapes-train", "num_prompts": None},  # shapes-train | shapes-val | a prompt file
    # α_rew = reward.alpha (0: Diff-Instruct; the reward is then never loaded). spec: any registry reward or
    # weighted sum, e.g. "shapes-clip", "trained" with checkpoints {trained: DIR}, "0.5*hpsv2.1+aesthetic".
    "reward": {"spec": "shapes-clip", "alpha": 1.0, "checkpoints": {}, "options": {}},
    "guidance": 3.0,  # α_cfg of the reference score s̃_ref
    # t_init None: the top of the schedule's table (VP T − 1, flow σ = 1) for v/x0/velocity prediction (x̂_0 stays
    # bounded), 625 for ε-prediction (see prefalign.diffusion.one_step.initial_timestep).
    "generator": {"t_init": None},
    # The generator g_θ; reference None: adapter with LoRA (s_ref is the base with adapters off), else copy.
    "policy": {"lora_rank": None, "lora_alpha": None, "lora_targets": list(DEFAULT_LORA_TARGETS), "reference": None},
    # The teaching assistant s_ψ: initialised from the reference, K_TA = updates DSM steps per generator step.
    # A TA learning rate above the generator's (two time-scale updates, as DMD2's 5 TA steps per generator step)
    # keeps s_ψ tracking the generator; with equal rates the shapes generator collapsed onto one colour.
    "ta": {"updates": 1, "lr": 1e-3, "weighting": "uniform", "lora_rank": None, "lora_alpha": None},
    "train": {
        "steps": 300, "batch_size": 8, "lr": 2e-4, "lr_schedule": "constant", "warmup_steps": 0,
        "adam_betas": [0.0, 0.999],  # Diff-Instruct's β1 = 0, for both networks
        "grad_clip": 1.0, "t_min": 20, "t_max": 980,  # π(t) = U{t_min..t_max} over the training table
        "ikl_weighting": "dmd",  # w(t): x0 (Diff-Instruct code) or dmd (x0 normalised per sample, as DMD)
        "mixed_precision": "no", "ema_decay": None,  # ema_decay: Diff-Instruct keeps an EMA of the generator
        "log_every": 10, "checkpoint_every": 100,
    },
    "eval": {"every": 100, "prompts": "shapes-val", "num_prompts": 32, "samples_per_prompt": 2, "seed": 1234,
             "rewards": ["shapes-oracle", "shapes-clip"], "reward_checkpoints": {},
             "reward_options": {}, "keep_best": None},
    "save_dtype": None,  # e.g. float16 for the saved generator
}


def model_score(
    output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, x̂_0) of a network output: ∇ log p_t(x_t) ≈ −ε̂/σ_t = (α_t x̂_0 − x_t)/σ_t² (Tweedie's formula;
    docs/dipp.md Eq. 2) for any x_t = α_t x_0 + σ_t ε: ε-, v- or x_0-prediction on VP, and the rectified-flow
    velocity v, where it is −(x_σ + (1 − σ)v)/σ."""
    x0_hat, eps_hat = predicted_x0_eps(output.to(x_t.dtype), x_t, alpha, sigma, prediction_type)
    return score_from_eps(eps_hat, sigma), x0_hat


def ikl_weight(kind: str, alpha: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, x0_ref: torch.Tensor
               ) -> torch.Tensor:
    """w(t), shaped [B, 1, …]. `x0`: σ²/α², so that ∂L/∂x_0 = x̂_0^TA − x̂_0^ref (Diff-Instruct's EDM weight σ²)
    whatever α, σ (VP or rectified flow, α = 1 − σ), since s_ψ − s̃_ref = α(x̂_0^TA − x̂_0^ref)/σ².
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


def ikl_term(policy: Policy, ta: DiffusionModel, x0: torch.Tensor, cond: Conditioning, uncond: Conditioning,
             t: torch.Tensor, noise: torch.Tensor, guidance: float, weighting: str) -> tuple[torch.Tensor, float]:
    """The IKL surrogate per sample at x_t = α_t x_0 + σ_t ε (differentiable in x_0 only) and the mean size of its
    x_0-gradient |w·α·(s_ψ − s̃_ref)|, from the TA `ta` and the policy's reference at CFG scale `guidance`."""
    schedule = policy.model.schedule
    x_t = schedule.add_noise(x0, noise, t)
    alpha, sigma = schedule.alpha_sigma(t, like=x_t)
    with torch.no_grad():
        score_ta = model_score(ta(x_t.detach(), t, cond), x_t.detach(), alpha, sigma, ta.prediction_type)[0]
        score_ref, x0_ref = reference_score(policy, x_t.detach(), t, cond, uncond, guidance)
        weight = ikl_weight(weighting, alpha, sigma, x0.detach(), x0_ref)
    size = float((weight * alpha * (score_ta - score_ref)).abs().mean())
    return ikl_surrogate(x_t, score_ta, score_ref, weight), size


class TeachingAssistant:
    """s_ψ: a Policy of its own with its own Adam, starting as the reference (Diff-Instruct initialises
    Sg = teacher): the generator's denoiser with any LoRA merged, beside the same text encoders and VAE. Its weights
    and optimizer state are DI++'s method state, so a resumed run continues exactly."""

    def __init__(self, run: Run, lora_rank: int | None, lora_alpha: float | None, lr: float) -> None:
        config, policy = run.config, run.policy
        self.policy = Policy(policy.model.with_denoiser(policy.merged_denoiser()), lora_rank, lora_alpha,
                             config["policy"]["lora_targets"], reference="none")
        self.optimizer = self.policy.prepare(
            run.accelerator, make_optimizer(self.policy.trainable_parameters(), config["train"], lr=lr))
        self.accelerator, self.model = run.accelerator, self.policy.model.train(True)

    def update(self, x0: torch.Tensor, cond: Conditioning, t: torch.Tensor, noise: torch.Tensor, weighting: str,
               lr: float, grad_clip: float | None) -> float:
        """One DSM step on sg[x_0]; returns its loss. A non-finite TA makes the step's generator loss non-finite,
        so the loop's NaN guard stops the run there."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = ta_dsm_loss(self.model, x0, cond, t, noise, weighting)
        self.accelerator.backward(loss)
        if grad_clip:
            self.accelerator.clip_grad_norm_(self.policy.trainable_parameters(), grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"ta": self.policy.trainable_state(), "ta_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_trainable_state(state["ta"])
        self.optimizer.load_state_dict(state["ta_optimizer"])


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


def table_timesteps(schedule: Schedule, index: torch.Tensor) -> torch.Tensor:
    """Timesteps of training-table entries `index` ∈ {0..T−1}: the VP timestep itself, or t = σ_index·T for
    rectified flow (the shifted σ the flow model trained on), so π(t) and the TA's draws serve both families."""
    return schedule.timesteps_from_fraction((index.to(torch.float64) + 0.5) / schedule.num_timesteps)


def evaluate_one_step(model: DiffusionModel, t_init: float, prompts: Sequence[str], rewards: dict, ev: dict
                      ) -> dict[str, float]:
    """One-step samples of each eval prompt (seeds eval.seed + i: z is the x_T a sampler draws for that seed):
    every reward's mean and 95 % bootstrap CI over prompts, and the samples' diversity."""
    samples = ev["samples_per_prompt"]
    batch = [p for p in prompts for _ in range(samples)]
    groups = [i for i in range(len(prompts)) for _ in range(samples)]
    images = one_step_source(model, t_init)(batch, [ev["seed"] + i for i in range(len(batch))])
    return {**reward_table(images, batch, rewards, groups), "diversity": sample_diversity(images, groups)}


def _check(config: dict, t_init: float, schedule: Schedule) -> None:
    train, T = config["train"], schedule.num_timesteps
    if train["ikl_weighting"] not in IKL_WEIGHTINGS:
        raise PrefalignError(f"train.ikl_weighting '{train['ikl_weighting']}' unknown; use x0 or dmd")
    if not 0 < train["t_min"] <= train["t_max"] < T:
        raise PrefalignError(f"need 0 < train.t_min <= train.t_max < {T} (entries of the model's training table)")
    if config["ta"]["updates"] < 1:
        raise PrefalignError("ta.updates (K_TA) must be at least 1")


def dipp_method(run: Run) -> Method:
    """DI++ for the loop: each step K_TA DSM updates of the TA s_ψ (method state), then one micro-batch whose loss
    is the generator loss L_G (the loop's optimizer step)."""
    config, policy = run.config, run.policy
    tr, ta_cfg, model = config["train"], config["ta"], policy.model
    t_init = initial_timestep(model, config["generator"]["t_init"])
    _check(config, t_init, model.schedule)
    ta = TeachingAssistant(run, ta_cfg["lora_rank"], ta_cfg["lora_alpha"], ta_cfg["lr"])
    alpha_rew, spec = float(config["reward"]["alpha"]), config["reward"]["spec"]
    reward = load_training_reward(config["reward"], run.device) if alpha_rew else None
    prompts, uncond = load_prompts(config["data"]["prompts"], config["data"]["num_prompts"]), model.encode_prompts([""])
    world, rank, size = run.accelerator.num_processes, run.accelerator.process_index, int(tr["batch_size"])
    updates, T = int(ta_cfg["updates"]), model.schedule.num_timesteps
    guided_rows = 1 if config["guidance"] == 1 or model.strategy.embeds_guidance(model) else 2  # s̃_ref's rows

    def share(draw: torch.Tensor) -> torch.Tensor:
        """This process's part of a global draw, so N processes see what one process would."""
        return draw[rank * size:(rank + 1) * size].to(run.device)

    def micro_batches(step: int, g: torch.Generator):
        batch = [prompts[i] for i in share(torch.randint(len(prompts), (size * world,), generator=g)).tolist()]
        cond = model.encode_prompts(batch)
        shape = (size * world, *model.sample_shape)
        x0 = one_step_x0(model, share(torch.randn(shape, generator=g)), cond, t_init)  # 1. g_θ(z, c), with graph
        lr = lr_at(step, ta_cfg["lr"], tr["warmup_steps"], tr["steps"], tr["lr_schedule"])
        ta_losses = []
        for _ in range(updates):  # 2. K_TA DSM updates of s_ψ on sg[x_0]
            t_ta = table_timesteps(model.schedule, share(torch.randint(T, shape[:1], generator=g)))
            ta_losses.append(ta.update(x0, cond, t_ta, share(torch.randn(shape, generator=g)), ta_cfg["weighting"],
                                       lr, tr["grad_clip"]))
        # 3. the generator: IKL gradient through x_t, reward gradient through x_0.
        t = table_timesteps(model.schedule, share(torch.randint(tr["t_min"], tr["t_max"] + 1, shape[:1], generator=g)))
        ikl, ikl_grad = ikl_term(policy, ta.model, x0, cond, uncond, t, share(torch.randn(shape, generator=g)),
                                 config["guidance"], tr["ikl_weighting"])
        rewards = reward.differentiable(model.decode(x0), batch) if reward is not None else None
        loss = generator_loss(ikl, rewards, alpha_rew)
        stats = {"loss": float(loss.detach()), "ta_loss": sum(ta_losses) / updates, "ikl_grad": ikl_grad}
        if rewards is not None:
            stats["train_reward"] = float(rewards.detach().float().mean())
        yield MicroBatch(loss, stats, fb_rows=size * (1 + updates), fwd_rows=size * (1 + guided_rows))

    def on_save(out_dir: Path) -> None:
        write_meta(out_dir, t_init, {"method": "dipp" if alpha_rew else "diff-instruct", "reward": spec,
                                     "alpha_rew": alpha_rew, "alpha_cfg": config["guidance"], "steps": tr["steps"]})

    return Method("dipp", f"DI++ (α_rew = {alpha_rew:g}, α_cfg = {config['guidance']:g})", micro_batches,
                  ["loss", "ta_loss", "ikl_grad", "train_reward"],
                  evaluate=lambda model, prompts, rewards, ev: evaluate_one_step(model, t_init, prompts, rewards, ev),
                  state_dict=ta.state_dict, load_state_dict=ta.load_state_dict, on_save=on_save)


def train(config: dict, run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Train a DI++ (or, with reward.alpha = 0, Diff-Instruct) one-step generator; resumes from
    run_dir/checkpoint.pt with `resume`. Writes metrics.csv/png, eval.csv/png and returns run_dir/generator."""
    policy = config["policy"]
    reference = policy["reference"] or ("adapter" if policy["lora_rank"] else "copy")
    return train_policy({**config, "policy": {**policy, "reference": reference}}, run_dir, dipp_method, log,
                        output=GENERATOR_DIR)


DEMO_OVERRIDES: dict = {
    "resume": True,
    "train": {"steps": 30, "batch_size": 8, "checkpoint_every": 1000},
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
