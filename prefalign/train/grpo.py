"""GRPO for diffusion and flow models: online reward optimisation with group-normalised advantages and the
PPO-clipped likelihood ratio of sampler transitions (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, official
code yifan123/flow_grpo; DanceGRPO, Xue et al. 2025, arXiv 2505.07818, official code XueZeyue/DanceGRPO).

One optimizer step of the loop:
1. draw `sample.prompts_per_step` prompts (the global batch; each process takes its share of whole groups) and
   sample `sample.group_size` trajectories per prompt with the stochastic sampler (DDIM(η) for VP, Flow-GRPO's
   SDE with noise level η for flow) and CFG, storing (x_t, x_prev, log p_old) at the trained steps
   (`grpo_sampling.trained_steps`: a timestep fraction, or Flow-GRPO-Fast's SDE window);
2. score the images with the reward (a registry name or weighted sum) and normalise within each prompt's group;
3. one micro-batch per (sampling batch, trained step): recompute the guided output and log p, and the clipped
   surrogate loss (+ β·KL to the reference), divided by the number of micro-batches (Flow-GRPO accumulates
   gradients over the trained timesteps the same way).
Every micro-batch recomputes exactly the rows of one sampling forward with the same weights, so the ratio is
exactly 1 (both READMEs' check); the clip only matters off-policy. Deviations from the official codes: the
trained steps are shared by the step's samples (DanceGRPO permutes per sample), the group std is per prompt
(Flow-GRPO's SD3 configs use the global std), and the KL is the exact Gaussian one (Flow-GRPO's form times 1/|dσ|).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from prefalign.config import deep_merge
from prefalign.diffusion.generate import timestep_pairs
from prefalign.diffusion.models import Conditioning
from prefalign.errors import PrefalignError
from prefalign.rewards.combine import WeightedSumReward
from prefalign.train.common import (
    load_prompts,
    load_training_reward,
    policy_train_defaults,
    run_defaults,
    run_demo_policy_stage,
    sampled_eval_defaults,
)
from prefalign.train.grpo_sampling import (
    Rollout,
    group_advantages,
    sample_rollout,
    score_transition,
    trained_steps,
)
from prefalign.train.loop import Method, MicroBatch, Run, train_policy
from prefalign.train.policy import DEFAULT_LORA_TARGETS, Policy

DEFAULTS: dict = {
    **run_defaults(),
    "model": None,  # base pipeline: None / "shapes-teacher[:DIR]" (the shapes teacher) or a pipeline directory
    "data": {"prompts": "shapes-train", "num_prompts": None},  # shapes-train | shapes-val | a prompt file
    # spec: a registry reward or weighted sum ("0.5*shapes-clip+0.5*aesthetic"); advantage: sum | per_reward
    "reward": {"spec": "shapes-clip", "checkpoints": {}, "options": {}, "advantage": "sum"},
    # Flow-GRPO SD3.5: LoRA r = 32, α = 64, the reference is the base with the adapter disabled.
    "policy": {"lora_rank": 32, "lora_alpha": 64.0, "lora_targets": list(DEFAULT_LORA_TARGETS),
               "reference": "adapter"},
    # Flow-GRPO SD3.5: 10 SDE steps, noise level 0.7, CFG 4.5, groups of 24 (DanceGRPO SD1.4: DDIM η = 1, CFG 5).
    "sample": {"steps": 10, "eta": 0.7, "guidance": 4.5, "group_size": 24, "prompts_per_step": 24,
               "negative_prompt": "", "sde_window_size": 0, "sde_window_range": [0, None]},
    "loss": {"clip_range": 1e-4, "adv_clip_max": 5.0, "kl_beta": 0.04},
    "train": policy_train_defaults(
        steps=300,
        batch_size=8,  # rows per sampling forward and per training micro-batch (per process)
        lr=3e-4,
        weight_decay=1e-4,
        log_every=1,
        checkpoint_every=50,
        timestep_fraction=0.99,
        timestep_selection="first",  # first (Flow-GRPO) | random (DanceGRPO)
    ),
    "eval": sampled_eval_defaults(every=50),
    "save_dtype": None,
}


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              adv_clip_max: float, kl: torch.Tensor | None = None, kl_beta: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO surrogate of one transition per sample, averaged over the batch: with r = exp(log p_θ −
    log p_old) and A clamped to ±adv_clip_max, mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε))) (PPO's L^CLIP,
    Schulman et al. 2017 Eq. 7, as Flow-GRPO's objective uses it), plus β·mean(KL) to the reference."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss + kl_beta * kl.mean() if kl is not None else policy_loss
    stats = {"policy_loss": float(policy_loss.detach()), "ratio": float(ratio.detach().mean()),
             "clipfrac": float(((ratio.detach() - 1).abs() > clip_range).float().mean()),
             "approx_kl": float(0.5 * ((log_prob - old_log_prob).detach() ** 2).mean())}
    if kl is not None:
        stats["kl"] = float(kl.detach().mean())
    return loss, stats


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL between the policy's and the reference's transition Gaussians of equal std, averaged over
    elements: mean‖μ_θ − μ_ref‖²/(2σ²), [B] (Flow-GRPO's KL term, with the transition's own σ)."""
    return ((mean.float() - reference_mean.float()) ** 2 / (2 * std.float() ** 2)).flatten(1).mean(1)


class Rewards:
    """The training reward's terms (weight, model) and their direction, scored on decoded images."""

    def __init__(self, section: dict, device: torch.device) -> None:
        reward = load_training_reward(section, device)
        pairs = zip(reward.weights, reward.rewards, strict=True) if isinstance(reward, WeightedSumReward) else [(1.0, reward)]
        self.weights, self.models = zip(*pairs, strict=True)
        self.sign = 1.0 if reward.higher_is_better else -1.0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[N, K] rewards of the K terms (negated where lower is better)."""
        return self.sign * torch.stack([m.score(images.cpu(), prompts).float().cpu() for m in self.models], 1)


def grpo_step(policy: Policy, rollout: Rollout, j: int, pair: tuple[float, float], advantages: torch.Tensor,
              uncond: Conditioning, config: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the rollout's j-th trained transition (t, prev_t) = `pair`: the policy's guided output
    re-scores the stored x_t → x_prev; with `loss.kl_beta` > 0 the reference's output gives the KL term."""
    model, sample, loss_cfg = policy.model, config["sample"], config["loss"]
    kwargs, (t, prev_t), x_t = model.sampler_kwargs(), pair, rollout.x_t[j]
    t_batch = torch.full((len(x_t),), t, device=x_t.device,
                         dtype=torch.float32 if model.schedule.kind == "flow" else torch.long)
    output = model.guided(x_t, t_batch, rollout.cond, uncond, sample["guidance"])
    log_prob, step = score_transition(model.schedule, output, t, prev_t, x_t, rollout.x_prev[j], sample["eta"],
                                      **kwargs)
    kl = None
    if loss_cfg["kl_beta"] > 0:
        reference = policy.reference_guided(x_t, t_batch, rollout.cond, uncond, sample["guidance"])
        _, reference_step = score_transition(model.schedule, reference, t, prev_t, x_t, rollout.x_prev[j],
                                             sample["eta"], **kwargs)
        kl = gaussian_kl(step.mean, reference_step.mean, step.std)
    loss, stats = grpo_loss(log_prob, rollout.log_prob[j], advantages, loss_cfg["clip_range"],
                            loss_cfg["adv_clip_max"], kl, loss_cfg["kl_beta"])
    return loss, {"loss": float(loss.detach()), **stats}


def grpo_method(run: Run) -> Method:
    """GRPO for the loop: per step, rollouts of whole prompt groups on each process, then one micro-batch per
    (sampling batch of `train.batch_size` rows, trained step)."""
    config, accelerator, policy = run.config, run.accelerator, run.policy
    sample, loss_cfg, tr = config["sample"], config["loss"], config["train"]
    model, world, rank = policy.model, accelerator.num_processes, accelerator.process_index
    group, batch_size = int(sample["group_size"]), int(tr["batch_size"])
    num_prompts = int(sample["prompts_per_step"])
    if num_prompts % world:
        raise PrefalignError(f"sample.prompts_per_step={num_prompts} must be divisible by the {world} processes")
    if (num_prompts // world * group) % batch_size:
        raise PrefalignError(f"train.batch_size={batch_size} must divide the {num_prompts // world * group} samples "
                             "per process (prompts_per_step / processes × group_size)")
    prompts = load_prompts(config["data"]["prompts"], config["data"]["num_prompts"])
    rewards = Rewards(config["reward"], run.device)
    kwargs = model.sampler_kwargs()
    pairs = timestep_pairs(model.schedule, int(sample["steps"]), **kwargs)
    eta, guidance = float(sample["eta"]), float(sample["guidance"])
    rows = 2 if guidance != 1 and not model.strategy.embeds_guidance(model) else 1  # CFG's [uncond; cond] batch
    window = [sample["sde_window_size"], *sample["sde_window_range"]]
    trained_steps(len(pairs), tr["timestep_fraction"], tr["timestep_selection"], window, torch.Generator())  # fail early
    uncond = model.encode_prompts([sample["negative_prompt"]])
    run.log(f"[grpo] {len(prompts)} prompts, {num_prompts} × {group} samples per step, {len(pairs)} sampler steps")

    def denoise(cond):
        return lambda x, t: model.guided(x, t, cond, uncond, guidance)

    def rollouts(step_prompts: list[str], seeds: list[int], stochastic, trained) -> list[Rollout]:
        out = []
        for i in range(0, len(seeds), batch_size):
            with torch.no_grad():
                cond = model.encode_prompts(step_prompts[i:i + batch_size])
            out.append(sample_rollout(denoise(cond), cond, seeds[i:i + batch_size], model.sample_shape,
                                      model.schedule, pairs, eta, stochastic, trained, run.device, model.dtype,
                                      **kwargs))
        return out

    def micro_batches(step: int, generator: torch.Generator):
        picks = torch.randint(len(prompts), (num_prompts,), generator=generator).tolist()
        seeds = torch.randint(2**62, (num_prompts * group,), generator=generator).tolist()
        stochastic, trained = trained_steps(len(pairs), tr["timestep_fraction"], tr["timestep_selection"], window,
                                            generator)
        share = slice(rank * num_prompts // world * group, (rank + 1) * num_prompts // world * group)
        step_prompts = [prompts[p] for p in picks for _ in range(group)][share]
        batches = rollouts(step_prompts, seeds[share], stochastic, trained)
        with torch.no_grad():
            scores = rewards(torch.cat([model.decode(b.x0) for b in batches]), step_prompts)
        advantages = group_advantages(scores, rewards.weights, group, config["reward"]["advantage"]).to(run.device)
        total = (scores * torch.tensor(rewards.weights)).sum(1) * rewards.sign
        reward_stats = {"reward": float(total.mean()),
                        "reward_std": float(total.reshape(-1, group).std(1, unbiased=False).mean())}
        count, sampled = len(batches) * len(trained), len(step_prompts) * len(pairs) * rows
        for b, rollout in enumerate(batches):
            adv = advantages[b * batch_size:(b + 1) * batch_size]
            for j, index in enumerate(trained):
                loss, stats = grpo_step(policy, rollout, j, pairs[index], adv, uncond, config)
                first = b == 0 and j == 0  # the step's sampling forwards are counted once
                reference_rows = len(adv) * rows if loss_cfg["kl_beta"] > 0 else 0
                yield MicroBatch(loss / count, {**stats, **reward_stats}, fb_rows=len(adv) * rows,
                                 fwd_rows=(sampled if first else 0) + reference_rows)

    return Method("grpo", "GRPO", micro_batches, ["reward", "reward_std", "loss", "kl", "ratio"])


def train(config: dict, run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """GRPO from `config` (see DEFAULTS) in `run_dir`; returns `run_dir/"model"` (a pipeline directory).

    Writes metrics.csv/png (reward, loss, KL, ratio per step), eval.csv/png (held-out rewards vs compute) and
    checkpoint.pt (every `train.checkpoint_every` steps; `resume: true` continues it exactly).
    """
    return train_policy(config, run_dir, grpo_method, log)


DEMO_OVERRIDES: dict = {
    "reward": {"spec": "shapes-clip"},
    "policy": {"lora_rank": 8, "lora_alpha": 8.0},
    # 16 rollouts (2 prompts × 8) of 6 DDIM(η = 1) steps per optimizer step, 2 random steps trained: ~20-40 s on CPU
    "sample": {"steps": 6, "eta": 1.0, "guidance": 3.0, "group_size": 8, "prompts_per_step": 2},
    "loss": {"kl_beta": 0.0},
    "train": {"steps": 10, "batch_size": 16, "lr": 1e-3, "timestep_fraction": 0.34, "timestep_selection": "random",
              "checkpoint_every": 10},
    "eval": {"every": 0},
    "resume": True,  # re-running the demo reuses the finished stage
}


def demo_stage(ctx) -> None:
    """`prefalign demo` stage "grpo": a short GRPO run of the teacher on the shapes-clip reward in `grpo/`;
    registers generator "GRPO" (sampled like the teacher) for the leaderboard."""
    run_demo_policy_stage(ctx, "grpo", "GRPO", deep_merge(DEFAULTS, DEMO_OVERRIDES), train)
