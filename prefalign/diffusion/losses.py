"""Denoising losses as small callables shared by pretraining, SFT warm-up and Diffusion-DPO."""

from __future__ import annotations

import torch

from prefalign.diffusion.schedules import Schedule, training_target
from prefalign.diffusion.weighting import loss_weight


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all non-batch dimensions → [B] (the per-element mean the official DPO code uses)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def denoising_loss(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    prediction_type: str = "epsilon",
    weighting: str = "uniform",
    snr_gamma: float = 5.0,
) -> torch.Tensor:
    """Weighted denoising score-matching loss per sample (DDPM L_simple, Ho et al. 2020 Eq. 14, generalised).

    w(t)·‖f_θ(x_t, t) − target‖², target ∈ {ε, x_0, v, flow velocity ε − x_0} by `prediction_type`, w from `weighting`
    (uniform | snr | min_snr with γ = `snr_gamma`). Returns [B]; the caller takes the mean.
    """
    alpha, sigma = schedule.alpha_sigma(t, like=x0)
    target = training_target(x0, noise, alpha, sigma, prediction_type)
    weight = loss_weight(schedule.snr(t), weighting, prediction_type, snr_gamma).to(model_output.device)
    return weight.float() * per_sample_mse(model_output, target)
