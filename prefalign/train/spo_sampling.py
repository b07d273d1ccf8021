"""SPO's step-wise resampler: branch a pool of candidates from one x_t, keep the best/worst pair by a step-aware
preference model, continue from a random candidate (Liang et al. 2024, arXiv 2406.04314; official code
RockeyCoss/SPO `spo/custom_diffusers/multi_sample_pipeline.py` and `preference_models/compare_funcs.py`).

Everything here is a function of tensors: the policy enters as `denoise(x_t, t) -> guided model output`, the
preference model as `score(x0_images, t, prompt_index) -> logits`, so the same loop serves SD, SDXL, SD3, FLUX and
the shapes teachers, and tests can drive it with stand-ins. Steps are the schedule's own sampler
(`generate.transition`): DDIM(η) for VP, Flow-GRPO's SDE with noise level η for rectified flow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from prefalign.diffusion.generate import timestep_pairs, transition
from prefalign.diffusion.schedules import Schedule, predicted_x0_eps

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Decode = Callable[[torch.Tensor], torch.Tensor]
Score = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepPairs:
    """Kept preference pairs of one-step transitions x_t → x_{t−1}: winner and loser share x_t."""

    x_t: torch.Tensor  # [N, C, H, W]
    x_win: torch.Tensor  # [N, C, H, W]
    x_lose: torch.Tensor  # [N, C, H, W]
    t: torch.Tensor  # [N] timestep of x_t: long DDIM t (VP) or float t = σ·T (flow)
    prev_t: torch.Tensor  # [N] timestep of the candidates (the final step: < 0 for VP, 0 for flow)
    prompt: torch.Tensor  # [N] long, index into the prompts of the sampling batch
    gap: torch.Tensor  # [N] softmax probability gap p_win − p_lose of the pair

    def __len__(self) -> int:
        return self.t.shape[0]

    def index(self, idx: torch.Tensor | slice) -> StepPairs:
        """The pairs at `idx` (a slice or an index tensor)."""
        return StepPairs(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @staticmethod
    def cat(parts: list[StepPairs]) -> StepPairs:
        """Concatenate pair sets (one per branching step) into one."""
        return StepPairs(*(torch.cat([getattr(p, f) for p in parts]) for f in StepPairs.__dataclass_fields__))


@dataclass
class PoolStats:
    """What one sampling batch cost and produced (per-sample rows of the batch, summed)."""

    denoiser_rows: int = 0  # x_t rows through `denoise` (multiply by 2 for CFG's [uncond; cond] batch)
    scored: int = 0  # candidate x̂_0 images scored by the preference model
    considered: int = 0  # (sample, branching step) pairs that were compared
    kept: int = 0
    gap_sum: float = 0.0  # sum of the probability gaps over considered pairs

    def __add__(self, other: PoolStats) -> PoolStats:
        return PoolStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def select_pair(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best and worst candidate of each pool and whether the pair is kept (official `preference_score_compare`).

    `scores` is [k, B] (logits, PickScore convention). The two extreme scores go through a softmax; the pair is
    kept when p_best − p_worst > `threshold` (0.3 for SD1.5, 0.4 for SDXL). Returns (win, lose, keep, gap), [B].
    """
    ranked, order = torch.sort(scores, dim=0, descending=True)
    probs = torch.stack([ranked[0], ranked[-1]]).float().softmax(dim=0)
    gap = probs[0] - probs[1]
    return order[0], order[-1], gap > threshold, gap


def predicted_x0(
    model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule, prediction_type: str,
    clip_sample: float | None = None,
) -> torch.Tensor:
    """The sampler's x̂_0 at timestep t (x_t − σ·û for flow), clamped like the scheduler's `clip_sample`: the
    input of the preference model."""
    alpha, sigma = schedule.alpha_sigma(t.to(x_t.device), like=x_t)
    x0 = predicted_x0_eps(model_output, x_t, alpha, sigma, prediction_type)[0]
    return x0 if clip_sample is None else x0.clamp(-clip_sample, clip_sample)


@torch.no_grad()
def sample_step_pairs(
    denoise: Denoise,
    decode: Decode,
    score: Score,
    x_T: torch.Tensor,
    schedule: Schedule,
    num_steps: int,
    pool_size: int,
    threshold: float,
    eta: float = 1.0,
    timestep_range: tuple[float, float] = (0, 751),
    generator: torch.Generator | None = None,
    **sampler_kwargs,
) -> tuple[StepPairs, PoolStats]:
    """One SPO sampling pass over a batch; returns the kept pairs and what the pass cost.

    Steps (t, prev_t) of the sampler's grid (`generate.timestep_pairs`) whose t lies in `timestep_range`
    (inclusive) and whose step std is non-zero branch: k = `pool_size` candidates x_{t−1}^j = μ(x_t) + σ z_j share
    x_t and its mean (the step's own draw and k − 1 more). t is the timestep the network receives: DDIM's integer
    t for VP (official SD1.5: the last 16 of 20 steps, x_t at t ≤ 751 with steps_offset 1) and t = σ·T for
    rectified flow, so a range [0, 751] keeps x_t with σ ≤ 0.751: the last 15 of an unshifted 20-step grid
    (σ = 1 … 0.001; by noise level, SD1.5's t = 751 has SNR 0.059, a flow's σ = 0.80), fewer of a shifted one
    (SD3, FLUX), which spends more of its steps at high noise. Each candidate's x̂_0 comes from the policy's
    output at t−1 (which the chosen candidate reuses for its own next step, so scoring costs no extra forwards),
    is decoded and scored at timestep t−1; after the final step the candidates themselves are scored at t = 0.
    The best/worst pair is kept by `select_pair`, and every chain continues from a uniformly random candidate,
    kept or not. Other steps are plain sampler steps. `sampler_kwargs` are `DiffusionModel.sampler_kwargs()`.
    """
    grid = timestep_pairs(schedule, num_steps, **sampler_kwargs)
    prediction_type, clip_sample = sampler_kwargs.get("prediction_type", "epsilon"), sampler_kwargs.get("clip_sample")
    batch, device = x_T.shape[0], x_T.device
    rows = torch.arange(batch, device=device)
    stats, kept = PoolStats(), []

    def forward(x: torch.Tensor, t: float) -> torch.Tensor:
        stats.denoiser_rows += x.shape[0]
        return denoise(x, torch.full((x.shape[0],), t, device=device))  # long for VP's int t, float for flow

    x, out = x_T, forward(x_T, grid[0][0])
    for i, (t, prev_t) in enumerate(grid):
        last = i == len(grid) - 1
        step = transition(schedule, out, t, prev_t, x, eta, generator=generator, **sampler_kwargs)
        if not (timestep_range[0] <= t <= timestep_range[1] and bool((step.std > 0).any())):
            x = step.prev_sample
            out = out if last else forward(x, prev_t)
            continue
        noise = torch.randn((pool_size - 1, *x.shape), generator=generator, device=device, dtype=x.dtype)
        candidates = torch.cat([step.prev_sample[None], step.mean + step.std * noise])  # [k, B, ...]
        flat = candidates.flatten(0, 1)
        if last:
            flat_out, x0 = None, flat
            t_score = torch.zeros(flat.shape[0], device=device, dtype=torch.long)
        else:
            flat_out = forward(flat, prev_t)
            t_score = torch.full((flat.shape[0],), prev_t, device=device)
            x0 = predicted_x0(flat_out, flat, t_score, schedule, prediction_type, clip_sample)
        scores = score(decode(x0), t_score, rows.repeat(pool_size)).reshape(pool_size, batch)
        win, lose, keep, gap = select_pair(scores, threshold)
        stats.scored += flat.shape[0]
        stats.considered += batch
        stats.kept += int(keep.sum())
        stats.gap_sum += float(gap.sum())
        if keep.any():
            k = keep.nonzero().squeeze(1)
            kept.append(StepPairs(
                x[k], candidates[win[k], k], candidates[lose[k], k], torch.full(k.shape, t, device=device),
                torch.full(k.shape, prev_t, device=device), k, gap[k],
            ))
        choice = torch.randint(0, pool_size, (batch,), generator=generator, device=device)
        x = candidates[choice, rows]
        if flat_out is not None:
            out = flat_out.reshape(pool_size, batch, *flat_out.shape[1:])[choice, rows]
    if not kept:
        empty = x_T[:0]
        none = torch.zeros(0, dtype=torch.long, device=device)
        return StepPairs(empty, empty, empty, none, none, none, torch.zeros(0, device=device)), stats
    return StepPairs.cat(kept), stats
