"""DDIM/DDPM steps with Gaussian log-probabilities, classifier-free guidance, and the DDIM sampler.

Everything is a pure function of tensors and a `NoiseSchedule`; the denoiser enters only through
`denoise(x_t, t) -> model_output`, so the same code serves SD, SDXL, PixArt and the shapes teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefalign.diffusion.schedules import NoiseSchedule, predicted_x0_eps
from prefalign.errors import PrefalignError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) in the diffusers convention: ε_uncond + w·(ε_cond − ε_uncond)."""
    return uncond + scale * (cond - uncond)


def ddim_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0
) -> list[int]:
    """Descending inference timesteps, as diffusers' DDIMScheduler.set_timesteps builds them.

    `leading` (SD's default with steps_offset=1 gives 951, 901, …, 1 for 20 steps), `trailing` (starts at T−1,
    recommended with zero-terminal-SNR schedules), `linspace`.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise PrefalignError(f"num_steps={num_steps} must be between 1 and num_train_timesteps={num_train_timesteps}")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        steps = [i * ratio + steps_offset for i in range(num_steps)]
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        steps = [round(num_train_timesteps - i * ratio) - 1 for i in range(num_steps)][::-1]
    elif spacing == "linspace":
        steps = [round(x) for x in torch.linspace(0, num_train_timesteps - 1, num_steps).tolist()]
    else:
        raise PrefalignError(f"unknown timestep spacing '{spacing}'; use leading, trailing or linspace")
    return sorted(steps, reverse=True)


@dataclass
class StepOutput:
    """One reverse step x_t → x_{t−1}: the sample, its Gaussian (mean, std), its log-density, and x̂_0, ε̂."""

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # [B, 1, …] broadcastable; 0 for deterministic DDIM
    log_prob: torch.Tensor | None  # [B] sum over non-batch dims; None when std == 0
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²·I) summed over all non-batch dimensions → [B]."""
    std = std.expand_as(x)
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return elementwise.flatten(1).sum(dim=1)


def ddim_step(
    model_output: torch.Tensor,
    t: torch.Tensor | int,
    prev_t: torch.Tensor | int,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    final_alpha_cumprod: float = 1.0,
    clip_sample: float | None = None,
) -> StepOutput:
    """Generalised DDIM step (Song et al. 2021, Eq. 12) with σ_t(η) from Eq. 16.

    x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1 − ᾱ_{t−1} − σ²)·ε̂ + σ·z,  σ² = η²·(1−ᾱ_{t−1})/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_{t−1}).
    η = 1 is the DDPM ancestral step (posterior q(x_{t−1}|x_t, x̂_0), Ho et al. 2020 Eq. 7) on the same grid.
    `prev_t < 0` means the final step and uses ᾱ = `final_alpha_cumprod` (diffusers' `set_alpha_to_one`).
    Pass `prev_sample` to evaluate the log-probability of a given x_{t−1} instead of drawing one (trainers re-score
    stored trajectories under the current policy). `clip_sample` clamps x̂_0 to ±value and re-derives ε̂
    (diffusers' `clip_sample` + DDIM's use of the clipped prediction).
    """
    t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
    prev_t = torch.as_tensor(prev_t, device=x_t.device).long().expand(x_t.shape[0])
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    abar = schedule.alphas_cumprod.to(x_t.device)
    abar_t = abar[t].reshape(shape)
    abar_prev = torch.where(prev_t >= 0, abar[prev_t.clamp(min=0)], torch.full_like(abar[t], final_alpha_cumprod))
    abar_prev = abar_prev.reshape(shape)

    # Work in the model's dtype; the schedule is float64 for accuracy of its own tables.
    dtype = x_t.dtype
    alpha_t, sigma_t = abar_t.sqrt().to(dtype), (1 - abar_t).sqrt().to(dtype)
    pred_x0, pred_eps = predicted_x0_eps(model_output, x_t, alpha_t, sigma_t, prediction_type)
    if clip_sample is not None:
        pred_x0 = pred_x0.clamp(-clip_sample, clip_sample)
        pred_eps = (x_t - alpha_t * pred_x0) / sigma_t

    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = (eta * variance.clamp(min=0).sqrt()).to(dtype)
    direction = (1 - abar_prev - std.to(abar_prev.dtype) ** 2).clamp(min=0).sqrt().to(dtype)
    mean = abar_prev.sqrt().to(dtype) * pred_x0 + direction * pred_eps

    stochastic = eta > 0 and bool((std > 0).any())
    if prev_sample is None:
        if stochastic:
            if noise is None:
                noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=dtype)
            prev_sample = mean + std * noise
        else:
            prev_sample = mean
    log_prob = gaussian_log_prob(prev_sample, mean, std) if stochastic else None
    return StepOutput(prev_sample, mean, std, log_prob, pred_x0, pred_eps)


def ddim_sample(
    denoise: Denoiser,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int = 50,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    spacing: str = "leading",
    steps_offset: int = 0,
    final_alpha_cumprod: float = 1.0,
    clip_sample: float | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[int, StepOutput]]]:
    """Run the DDIM sampler from pure noise x_T; `denoise(x_t, t)` returns the (already guided) model output.

    Returns x_0, or (x_0, [(t, StepOutput), …]) with `return_trajectory=True` for trainers that need the
    per-step log-probabilities.
    """
    steps = ddim_timesteps(num_steps, schedule.num_timesteps, spacing, steps_offset)
    stride = schedule.num_timesteps // num_steps
    x = x_T
    trajectory: list[tuple[int, StepOutput]] = []
    for t in steps:
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = ddim_step(
            denoise(x, t_batch), t, t - stride, x, schedule, prediction_type, eta,
            generator=generator, final_alpha_cumprod=final_alpha_cumprod, clip_sample=clip_sample,
        )
        if return_trajectory:
            trajectory.append((t, out))
        x = out.prev_sample
    return (x, trajectory) if return_trajectory else x
