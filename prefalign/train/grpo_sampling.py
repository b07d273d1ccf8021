"""GRPO's rollouts: groups of trajectories of the stochastic sampler with the log-probabilities of their trained
transitions, the steps to train on, and group-normalised advantages (Flow-GRPO, Liu et al. 2025, arXiv
2505.05470; DanceGRPO, Xue et al. 2025, arXiv 2505.07818).

The sampler is the shared one (`prefalign.diffusion.generate.transition`): DDIM(η) for VP, Flow-GRPO's SDE with
noise level η for rectified flow. A transition's log-probability is the Gaussian log-density *averaged* over the
elements of one sample (both official codes mean over the non-batch dimensions): no quantity mixes samples, so a
log-probability does not depend on how a batch is split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prefalign.diffusion.generate import transition
from prefalign.diffusion.models import Conditioning
from prefalign.diffusion.sampling import StepOutput
from prefalign.diffusion.schedules import Schedule
from prefalign.errors import PrefalignError

TIMESTEP_SELECTIONS = ("first", "random")
ADVANTAGES = ("sum", "per_reward")


def mean_log_prob(step: StepOutput) -> torch.Tensor:
    """Per-sample log-density of the transition averaged over its elements, [B] (Flow-GRPO / DanceGRPO)."""
    if step.log_prob is None:
        raise PrefalignError("GRPO needs a stochastic sampler: set sample.eta > 0")
    return step.log_prob / step.mean[0].numel()


def score_transition(schedule: Schedule, output: torch.Tensor, t: float, prev_t: float, x_t: torch.Tensor,
                     x_prev: torch.Tensor, eta: float, **sampler_kwargs) -> tuple[torch.Tensor, StepOutput]:
    """(mean log-probability [B], step) of the stored transition x_t → x_prev under the network `output`; the
    one code path of the old (sampling) and new (training) log-probabilities, so their ratio is exactly 1 when
    the weights and the batch are the same."""
    step = transition(schedule, output, t, prev_t, x_t, eta, prev_sample=x_prev, **sampler_kwargs)
    return mean_log_prob(step), step


def trained_steps(num_steps: int, fraction: float, selection: str, window: Sequence, generator: torch.Generator
                  ) -> tuple[list[int], list[int]]:
    """(stochastic steps, trained steps) of one optimizer step, as indices into the sampler's grid.

    The final step is never trained (DDIM's last step is deterministic; both official codes drop it). Without a
    window every step is stochastic and min(T − 1, int(T·fraction)) are trained: the noisiest first (Flow-GRPO)
    or a random subset (DanceGRPO; here shared by the step's samples, so a training micro-batch recomputes exactly
    the rows of one sampling forward). With `window = [size, low, high]`, size > 0 (Flow-GRPO-Fast's SDE window),
    only `size` consecutive steps starting at a random step in [low, high − size] are stochastic and trained; the
    others are ODE (η = 0) steps.
    """
    size, low, high = int(window[0]), int(window[1]), window[2]
    high = num_steps - 1 if high is None else min(int(high), num_steps - 1)
    if size > 0:
        if high - size < low:
            raise PrefalignError(f"sample.sde_window: {size} steps do not fit in steps [{low}, {high}] of "
                                 f"{num_steps}; lower sample.sde_window_size or widen sample.sde_window_range")
        start = low + int(torch.randint(high - size - low + 1, (1,), generator=generator))
        steps = list(range(start, start + size))
        return steps, steps
    count = min(num_steps - 1, int(num_steps * fraction))
    if count < 1:
        raise PrefalignError(f"train.timestep_fraction={fraction} trains no step of {num_steps}; raise it")
    if selection == "first":
        return list(range(num_steps)), list(range(count))
    if selection == "random":
        return list(range(num_steps)), sorted(torch.randperm(num_steps - 1, generator=generator)[:count].tolist())
    raise PrefalignError(f"train.timestep_selection '{selection}' unknown; use one of {', '.join(TIMESTEP_SELECTIONS)}")


@dataclass
class Rollout:
    """One sampled batch: its conditioning and, per trained step, the stored (x_t, x_prev, old log-probability)."""

    cond: Conditioning
    x_t: list[torch.Tensor]
    x_prev: list[torch.Tensor]
    log_prob: list[torch.Tensor]
    x0: torch.Tensor


@torch.no_grad()
def sample_rollout(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cond: Conditioning, seeds: Sequence[int],
    shape: Sequence[int], schedule: Schedule, pairs: Sequence[tuple[float, float]], eta: float,
    stochastic: Sequence[int], trained: Sequence[int], device: torch.device, dtype: torch.dtype, **sampler_kwargs,
) -> Rollout:
    """Sample one trajectory per seed with the stochastic sampler on the grid `pairs` ([(t, prev_t)]); x_T and
    every step's noise come from the sample's own seed, so a sample does not depend on its batch-mates or on
    the process that draws it. `denoise(x, t)` is the (guided) policy."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def noise() -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device, dtype)

    x, rollout = noise(), Rollout(cond, [], [], [], None)
    kind = torch.float32 if schedule.kind == "flow" else torch.long
    for i, (t, prev_t) in enumerate(pairs):
        output = denoise(x, torch.full((x.shape[0],), t, device=device, dtype=kind))
        if i not in stochastic:
            x = transition(schedule, output, t, prev_t, x, 0.0, **sampler_kwargs).prev_sample
            continue
        gaussian = transition(schedule, output, t, prev_t, x, eta, prev_sample=x, **sampler_kwargs)
        x_prev = (gaussian.mean + gaussian.std * noise()).to(x.dtype)
        if i in trained:
            rollout.x_t.append(x)
            rollout.x_prev.append(x_prev)
            rollout.log_prob.append(score_transition(schedule, output, t, prev_t, x, x_prev, eta,
                                                     **sampler_kwargs)[0])
        x = x_prev
    rollout.x0 = x
    return rollout


def group_advantages(rewards: torch.Tensor, weights: Sequence[float], group_size: int, mode: str = "sum",
                     eps: float = 1e-4) -> torch.Tensor:
    """Per-prompt group-normalised advantages A = (r − mean_group)/(std_group + eps) (Flow-GRPO's
    `PerPromptStatTracker`, population std, eps 1e-4), [N] from rewards [N, K] of K reward terms, consecutive
    groups of `group_size` rows. `sum` normalises the weighted sum Σ w_k r_k; `per_reward` normalises each term
    within the group first, then takes the weighted sum (scales of the terms then do not matter)."""
    if mode not in ADVANTAGES:
        raise PrefalignError(f"reward.advantage '{mode}' unknown; use one of {', '.join(ADVANTAGES)}")
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    rewards = rewards.float()
    if mode == "sum":
        rewards, w = (rewards * w).sum(1, keepdim=True), torch.ones(1)
    grouped = rewards.reshape(-1, group_size, rewards.shape[1])
    normalised = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=False, keepdim=True) + eps)
    return (normalised * w).sum(-1).reshape(-1)
