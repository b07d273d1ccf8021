"""Rectified-flow steps with the DDIM step's signature: the Euler ODE step and Flow-GRPO's SDE step.

x_σ = (1 − σ)·x_0 + σ·ε, network velocity u = ε − x_0; timesteps are t = σ·T as the networks receive them.
Both steps return `StepOutput` (sample, Gaussian mean/std, log-probability, x̂_0, ε̂) like `ddim_step`, so SPO
and RL-style trainers treat the two families alike.
"""

from __future__ import annotations

import torch

from prefalign.diffusion.conversions import predicted_x0_eps, training_target
from prefalign.diffusion.sampling import Denoiser, StepOutput, gaussian_log_prob
from prefalign.diffusion.schedules import FlowSchedule
from prefalign.errors import PrefalignError


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, device=like.device, dtype=torch.float64)
    return value.expand(like.shape[0]).reshape((-1,) + (1,) * (like.ndim - 1))


def flow_step(
    model_output: torch.Tensor,
    t: torch.Tensor | float,
    prev_t: torch.Tensor | float,
    x_t: torch.Tensor,
    schedule: FlowSchedule,
    prediction_type: str = "flow_prediction",
    noise_level: float = 0.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One step σ → σ' < σ of the reverse SDE with the rectified-flow marginals (Flow-GRPO, Liu et al. 2025).

    dx = [u + s²/(2σ)·(x + (1 − σ)·u)]·dσ + s·dw̄ with s = a·√(σ/(1 − σ)), a = `noise_level`, integrated by
    Euler–Maruyama: mean = x + u·dσ + s²/(2σ)·(x + (1 − σ)·u)·dσ, std = s·√(−dσ), dσ = σ' − σ. At σ = 1 the
    ratio uses 1 − σ' (Flow-GRPO's guard). a = 0 is the Euler ODE step x + u·dσ of FlowMatchEulerDiscreteScheduler
    (log_prob None). Computed in float32 at least (bf16 overflows there), returned in x_t's dtype. Pass
    `prev_sample` to score a stored transition. `log_prob` sums over non-batch dims (Flow-GRPO averages).
    """
    dtype = x_t.dtype
    compute = torch.promote_types(dtype, torch.float32)
    sigma = _per_sample(schedule.sigma_at(torch.as_tensor(t, dtype=torch.float64)), x_t)
    sigma_next = _per_sample(schedule.sigma_at(torch.as_tensor(prev_t, dtype=torch.float64)), x_t)
    if bool((sigma_next >= sigma).any()):
        raise PrefalignError("flow_step goes from noise to data: prev_t must be below t")
    alpha = 1 - sigma
    x = x_t.to(compute)
    pred_x0, pred_eps = predicted_x0_eps(model_output.to(compute), x, alpha.to(compute), sigma.to(compute),
                                         prediction_type)
    velocity = training_target(pred_x0, pred_eps, alpha.to(compute), sigma.to(compute), "flow_prediction")
    dt = sigma_next - sigma
    ratio_denominator = 1 - torch.where(sigma == 1, sigma_next, sigma)
    s = noise_level * (sigma / ratio_denominator).sqrt()
    drift_correction = (s**2 / (2 * sigma)).to(compute) * (x + alpha.to(compute) * velocity)
    mean = x + (velocity + drift_correction) * dt.to(compute)
    std = (s * (-dt).sqrt()).to(compute)
    stochastic = noise_level > 0
    if prev_sample is None:
        if stochastic and noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=compute)
        prev_sample = mean + std * noise.to(compute) if stochastic else mean
    log_prob = gaussian_log_prob(prev_sample.to(compute), mean, std) if stochastic else None
    return StepOutput(prev_sample.to(dtype), mean.to(dtype), std.to(dtype), log_prob, pred_x0.to(dtype),
                      pred_eps.to(dtype))


def flow_sample(
    denoise: Denoiser,
    x_T: torch.Tensor,
    schedule: FlowSchedule,
    num_steps: int = 28,
    prediction_type: str = "flow_prediction",
    noise_level: float = 0.0,
    generator: torch.Generator | None = None,
    spacing: str = "linspace",
    mu: float | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[float, StepOutput]]]:
    """Euler sampling of the flow ODE (FlowMatchEulerDiscreteScheduler), or of Flow-GRPO's SDE with
    `noise_level` > 0, on `schedule.sampling_sigmas(num_steps, spacing, mu)`; `denoise(x, t)` returns the
    (already guided) output at t = σ·T. Returns x_0, or (x_0, [(t, StepOutput), …])."""
    # float32 grid, as the diffusers scheduler keeps it, so the networks see the pipeline's exact timesteps.
    times = schedule.sampling_sigmas(num_steps, spacing, mu).to(torch.float32) * schedule.num_timesteps
    x = x_T
    trajectory: list[tuple[float, StepOutput]] = []
    for t, prev_t in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        out = flow_step(denoise(x, t_batch), t, prev_t, x, schedule, prediction_type, noise_level,
                        generator=generator)
        if return_trajectory:
            trajectory.append((t, out))
        x = out.prev_sample
    return (x, trajectory) if return_trajectory else x
