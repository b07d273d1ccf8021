"""Every conversion between a network's parameterisation and (x̂_0, ε̂), for any x_t = α·x_0 + σ·ε.

One module owns these formulas so no trainer writes x̂_0 by hand. Parameterisations (diffusers names):
- `epsilon`: ε (DDPM); `sample`: x_0;
- `v_prediction`: v = α·ε − σ·x_0 (Salimans & Ho 2022, §4 / App. D; VP schedules, α² + σ² = 1);
- `flow_prediction`: the rectified-flow velocity u = dx/dσ = ε − x_0 (SD3 / FLUX; α = 1 − σ).
The score of the marginal is ∇log p(x_t) = −ε̂/σ for both families.
"""

from __future__ import annotations

import torch

from prefalign.errors import PrefalignError

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _unknown(prediction_type: str) -> PrefalignError:
    return PrefalignError(f"unknown prediction_type '{prediction_type}'; known: {', '.join(PREDICTION_TYPES)}")


def predicted_x0_eps(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output to (x̂_0, ε̂) given x_t = α x_0 + σ ε.

    ε-prediction: x̂_0 = (x_t − σ ε̂)/α (DDIM Eq. 9); x0-prediction: ε̂ = (x_t − α x̂_0)/σ;
    v-prediction (VP): x̂_0 = α x_t − σ v̂, ε̂ = σ x_t + α v̂;
    flow velocity u = ε − x_0: x_t = (α + σ)x_0 + σu, so x̂_0 = (x_t − σ û)/(α + σ) (= x_t − σ û for rectified
    flow) and ε̂ = x̂_0 + û (= x_t + (1 − σ)û).
    """
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (x_t - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output
    if prediction_type == "flow_prediction":
        x0 = (x_t - sigma * model_output) / (alpha + sigma)
        return x0, x0 + model_output
    raise _unknown(prediction_type)


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What a network with this parameterisation outputs for (x_0, ε): ε, x_0, v = α ε − σ x_0 or u = ε − x_0.

    It is also the exact inverse of `predicted_x0_eps`: re-expressing (x̂_0, ε̂) as a network output."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * x0
    if prediction_type == "flow_prediction":
        return noise - x0
    raise _unknown(prediction_type)


def convert(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    source: str,
    target: str,
) -> torch.Tensor:
    """Re-express a network output from parameterisation `source` in `target` (e.g. ε → flow velocity)."""
    x0, eps = predicted_x0_eps(model_output, x_t, alpha, sigma, source)
    return training_target(x0, eps, alpha, sigma, target)


def score_from_eps(eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """∇_x log p_t(x_t) = −ε̂/σ (Tweedie; the same for VP and rectified flow)."""
    return -eps / sigma
