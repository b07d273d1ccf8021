"""Reward backpropagation through the last sampling steps: ReFL (Xu et al. 2023, ImageReward, arXiv 2304.05977;
official THUDM/ImageReward `ImageReward/ReFL.py`) and DRaFT-K (Clark et al. 2024, arXiv 2309.17400).

Both roll out the model's own sampler from x_T ~ N(0, I) (`generate.timestep_pairs` / `transition`: DDIM(η) for
VP, Euler or Flow-GRPO's SDE with noise level η for rectified flow; CFG through `model.guided`) and keep the
autograd graph only for the end of the trajectory (`backprop.mode`):

- `refl`: a stop step s ~ U{stop_range} (0-based on the grid of `sample.steps`; ReFL.py: 40 DDPM steps,
  `randint(30, 39)`, one draw per batch). Steps [0, s) run without gradient, step s with gradient, and the reward
  scores that step's prediction x̂_0 (`pred_original_sample`).
- `draft`: the first N − K steps without gradient, the last K = `backprop.last_k` with gradient through the
  sampler (DRaFT-K; K = N is full DRaFT), and the reward scores the final sample. DRaFT-1 equals ReFL stopped at
  the last step wherever the final step lands on x̂_0 (flow; VP with final ᾱ = 1).

The decoded images (`model.decode`, in [0, 1]) go through the reward's `differentiable` path. The loss per image
is −α·r (DRaFT's objective: maximise the reward), or α·ReLU(m − r) with `reward.margin` m, ReFL.py's form
(ReLU(2 − r)·grad_scale, grad_scale = 1e-3, on ImageReward's normalised score). Not implemented: the
pretraining-loss regulariser of the ImageReward paper (ReFL.py has none) and DRaFT-LV (no official code).

Compute: rollout forwards without gradient count as `fwd_calls` rows, gradient steps as `fb_calls` rows, two rows
per image when CFG runs an [uncond; cond] batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from prefalign.diffusion.generate import timestep_pairs, transition
from prefalign.diffusion.models import Conditioning, DiffusionModel
from prefalign.diffusion.sampling import StepOutput
from prefalign.errors import PrefalignError
from prefalign.train.common import (
    load_prompts,
    load_training_reward,
    policy_train_defaults,
    run_defaults,
    sampled_eval_defaults,
)
from prefalign.train.loop import Method, MicroBatch, Run, train_policy
from prefalign.train.policy import DEFAULT_LORA_TARGETS

DEFAULTS: dict = {
    **run_defaults(),
    "model": None,  # base pipeline: None / "shapes-teacher[:DIR]" (the shapes teacher) or a pipeline directory
    "data": {"prompts": "shapes-train", "num_prompts": None},  # shapes-train | shapes-val | a prompt file
    # No reference network: the loss needs none (ReFL.py fine-tunes the whole UNet).
    "policy": {"lora_rank": None, "lora_alpha": None, "lora_targets": list(DEFAULT_LORA_TARGETS),
               "reference": "none"},
    # spec: any registry reward with a differentiable path or a weighted sum, e.g. "0.5*hpsv2.1+aesthetic".
    # alpha: ReFL.py's grad_scale 1e-3; margin: None is −α·r, ReFL.py uses 2 with spec imagereward. options:
    # reward name -> {option: value}, e.g. {"shapes-clip": {"clip_at_zero": False}} keeps the gradient where
    # CLIPScore's max(cos, 0) would cut it.
    "reward": {"spec": "shapes-clip", "alpha": 1e-3, "margin": None, "checkpoints": {}, "options": {}},
    # ReFL.py samples 40 DDPMScheduler steps without CFG: DDIM η = 1 on the same grid is that ancestral step.
    "sample": {"steps": 40, "guidance": 1.0, "eta": 1.0, "negative_prompt": ""},
    "backprop": {"mode": "refl", "stop_range": [30, 39], "last_k": 1},
    # ReFL.py's launcher: 100 steps, 8 GPUs × batch 2 × grad-acc 4, lr 1e-5 constant, clip 1
    "train": policy_train_defaults(batch_size=2, checkpoint_every=50, grad_accum=4),
    "eval": sampled_eval_defaults(every=50),
    "save_dtype": None,  # e.g. float16 for the saved pipeline; training keeps fp32 master weights
}


def reward_loss(reward: torch.Tensor, alpha: float, margin: float | None = None) -> torch.Tensor:
    """Per-image loss: −α·r (DRaFT, Clark et al. 2024 Eq. 1 as a loss), or α·ReLU(m − r) with a margin m (ReFL.py's
    `ReLU(2 − r)·grad_scale`, which stops pushing images whose reward already exceeds m)."""
    reward = reward.float()
    return -alpha * reward if margin is None else alpha * torch.relu(margin - reward)


def grad_window(config: dict, generator: torch.Generator) -> tuple[int, int]:
    """(first step with gradient, last step) on the sampler grid: ReFL draws the stop step from `stop_range`,
    DRaFT-K takes the last K steps."""
    bp, steps = config["backprop"], int(config["sample"]["steps"])
    if bp["mode"] == "draft":
        return steps - int(bp["last_k"]), steps - 1
    low, high = (int(v) for v in bp["stop_range"])
    stop = low + int(torch.randint(high - low + 1, (1,), generator=generator))
    return stop, stop


def rollout(model: DiffusionModel, cond: Conditioning, uncond: Conditioning, x_T: torch.Tensor, grid: Sequence,
            grad_from: int, stop: int, sample: dict, generator: torch.Generator | None = None) -> StepOutput:
    """Sampler steps 0..`stop` of `grid` (`timestep_pairs`) from x_T with CFG; steps before `grad_from` run without
    gradient. Returns the last step's output (its sample and its x̂_0)."""
    x, step = x_T, None
    kwargs = model.sampler_kwargs(x_T.shape[1:])
    for i, (t, prev_t) in enumerate(grid[: stop + 1]):
        with torch.set_grad_enabled(i >= grad_from):
            out = model.guided(x, t, cond, uncond, float(sample["guidance"]))
            step = transition(model.schedule, out, t, prev_t, x, float(sample["eta"]), generator=generator, **kwargs)
        x = step.prev_sample
    return step


def check(config: dict) -> None:
    """One-line errors for settings that depend on each other (the schema `REFL` checks each key alone)."""
    bp, steps = config["backprop"], int(config["sample"]["steps"])
    if bp["mode"] == "draft" and not 1 <= int(bp["last_k"]) <= steps:
        raise PrefalignError(f"backprop.last_k must be between 1 and sample.steps ({steps}) for mode draft, got "
                             f"{bp['last_k']}")
    stop_range = bp["stop_range"]
    valid = isinstance(stop_range, list | tuple) and len(stop_range) == 2 and all(isinstance(v, int) for v in stop_range)
    if bp["mode"] == "refl" and not (valid and 0 <= stop_range[0] <= stop_range[1] < steps):
        raise PrefalignError(f"backprop.stop_range must be [low, high] with 0 <= low <= high < sample.steps "
                             f"({steps}), got {stop_range}")


def refl_method(run: Run) -> Method:
    """ReFL / DRaFT-K for the loop: `train.grad_accum` micro-batches of `train.batch_size` prompts per process."""
    config, accelerator, model = run.config, run.accelerator, run.policy.model
    tr, sample, rw = config["train"], config["sample"], config["reward"]
    reward = load_training_reward(rw, run.device)
    prompts = load_prompts(config["data"]["prompts"], config["data"]["num_prompts"])
    grid = timestep_pairs(model.schedule, int(sample["steps"]), **model.sampler_kwargs())
    uncond = model.encode_prompts([sample["negative_prompt"]])  # one row, broadcast by `guided`
    cfg_rows = 1 if float(sample["guidance"]) == 1 or model.strategy.embeds_guidance(model) else 2
    world, rank = accelerator.num_processes, accelerator.process_index
    accum, batch_size = int(tr["grad_accum"]), int(tr["batch_size"])
    margin = None if rw["margin"] is None else float(rw["margin"])

    def micro_batches(step: int, generator: torch.Generator):
        for _ in range(accum):
            # The global batch (prompts, x_T, stop step) comes from the step's generator, so N processes see what
            # one would; sampler noise (η > 0) is drawn on the device, seeded by that generator and the process.
            picks = torch.randint(len(prompts), (batch_size * world,), generator=generator)
            x_T = torch.randn((batch_size * world, *model.sample_shape), generator=generator)
            grad_from, stop = grad_window(config, generator)
            seed = int(torch.randint(2**62, (1,), generator=generator)) + rank
            noise = torch.Generator(run.device).manual_seed(seed)
            mine = slice(rank * batch_size, (rank + 1) * batch_size)
            batch = [prompts[i] for i in picks[mine].tolist()]
            cond = model.encode_prompts(batch)
            out = rollout(model, cond, uncond, x_T[mine].to(run.device, model.dtype), grid, grad_from, stop,
                          sample, noise)
            latents = out.pred_x0 if config["backprop"]["mode"] == "refl" else out.prev_sample
            rewards = reward.differentiable(model.decode(latents), batch)
            loss = reward_loss(rewards, float(rw["alpha"]), margin).mean()
            stats = {"loss": float(loss.detach()), "reward": float(rewards.detach().mean()), "stop": float(stop)}
            yield MicroBatch(loss / accum, stats, fb_rows=(stop - grad_from + 1) * batch_size * cfg_rows,
                             fwd_rows=grad_from * batch_size * cfg_rows)

    title = "ReFL" if config["backprop"]["mode"] == "refl" else f"DRaFT-{config['backprop']['last_k']}"
    return Method("refl", title, micro_batches, ["loss", "reward"])


def train(config: dict, run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """ReFL or DRaFT-K from `config` (see DEFAULTS) in `run_dir`; returns `run_dir/"model"` (a pipeline directory).

    Writes metrics.csv/png (training), eval.csv/png (rewards on held-out prompts vs step and compute),
    checkpoint.pt (every `train.checkpoint_every` steps; `resume: true` continues it exactly).
    """
    check(config)  # before any model loads
    return train_policy(config, run_dir, refl_method, log)
