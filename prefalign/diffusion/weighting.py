"""Per-timestep loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").

A scheme is defined by its weight on the x_0-space loss ‖x_0 − x̂_0‖² and converted to the space the network
predicts in, using ‖ε − ε̂‖² = SNR·‖x_0 − x̂_0‖², ‖v − v̂‖² = (SNR + 1)·‖x_0 − x̂_0‖² (VP) and, for the
rectified-flow velocity u = ε − x_0, ‖u − û‖² = ‖x_0 − x̂_0‖²/σ² with σ = 1/(1 + √SNR), SNR = ((1 − σ)/σ)²:
- `uniform`: weight 1 on the prediction's own loss (plain ε/v/x_0 MSE).
- `snr`: x_0-space weight SNR(t), i.e. the ε-MSE of DDPM's simplified loss, expressed for any target.
- `min_snr`: x_0-space weight min(SNR(t), γ), hence min(SNR, γ)/SNR for ε and
  min(SNR, γ)/(SNR + 1) for v, as in the official code; γ = 5 by default. SNR = 0 gets weight 1 there.
"""

from __future__ import annotations

import torch

from prefalign.errors import PrefalignError

LOSS_WEIGHTINGS = ("uniform", "snr", "min_snr")


def _x0_to_target_space(x0_weight: torch.Tensor, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    if prediction_type == "sample":
        return x0_weight
    if prediction_type == "epsilon":
        return x0_weight / snr
    if prediction_type == "v_prediction":
        return x0_weight / (snr + 1)
    if prediction_type == "flow_prediction":
        return x0_weight / (1 + snr.sqrt()) ** 2
    raise PrefalignError(
        f"unknown prediction_type '{prediction_type}'; use epsilon, sample, v_prediction or flow_prediction"
    )


def loss_weight(
    snr: torch.Tensor, scheme: str = "min_snr", prediction_type: str = "epsilon", gamma: float = 5.0
) -> torch.Tensor:
    """Weight for each sample's MSE in the prediction's own space, given SNR(t) per sample."""
    snr = snr.to(torch.float64)
    if scheme == "uniform":
        return torch.ones_like(snr)
    if scheme == "snr":
        return _x0_to_target_space(snr, snr, prediction_type)
    if scheme == "min_snr":
        weight = _x0_to_target_space(snr.clamp(max=gamma), snr, prediction_type)
        return torch.where(snr == 0, torch.ones_like(weight), weight)
    raise PrefalignError(f"unknown loss weighting '{scheme}'; known: {', '.join(LOSS_WEIGHTINGS)}")
