"""VP (variance-preserving) noise schedules and the conversions between their parameterisations.

Notation (Kingma et al. 2021, "Variational Diffusion Models"): x_t = α_t·x_0 + σ_t·ε with α_t² + σ_t² = 1,
ᾱ_t = α_t² ("alphas_cumprod" in DDPM/diffusers), SNR(t) = α_t²/σ_t², λ_t = log SNR(t).
The network never sees any of this: adapters pass it x_t and the integer timestep only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from prefalign.errors import PrefalignError

PredictionType = Literal["epsilon", "sample", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear β schedule (Ho et al. 2020, §4)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's schedule: linear in √β (diffusers `scaled_linear`)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17), β clipped at 0.999 (diffusers `squaredcos_cap_v2`)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


BETA_SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "squaredcos_cap_v2": cosine_betas,
    "cosine": cosine_betas,
}


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR = ᾱ / (1 − ᾱ)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def log_snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λ = log ᾱ − log(1 − ᾱ) (computed in that form for accuracy near ᾱ → 0 or 1)."""
    return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


def alphas_cumprod_from_log_snr(log_snr: torch.Tensor) -> torch.Tensor:
    """ᾱ = sigmoid(λ), the inverse of `log_snr_from_alphas_cumprod`."""
    return torch.sigmoid(log_snr)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete VP schedule over integer timesteps 0..T−1 (index t ↔ ᾱ_t, as in diffusers)."""

    alphas_cumprod: torch.Tensor  # [T], float64, decreasing

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        return cls(torch.cumprod(1 - betas.to(torch.float64), dim=0))

    @classmethod
    def make(
        cls,
        name: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
    ) -> NoiseSchedule:
        """Build a named schedule; `beta_start`/`beta_end` apply to the linear ones."""
        if name not in BETA_SCHEDULES:
            raise PrefalignError(f"unknown beta schedule '{name}'; known: {', '.join(BETA_SCHEDULES)}")
        kwargs = {}
        if name in ("linear", "scaled_linear"):
            kwargs = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
        return cls.from_betas(BETA_SCHEDULES[name](num_timesteps, **kwargs))

    @classmethod
    def from_diffusers_config(cls, config: dict) -> NoiseSchedule:
        """Read a diffusers scheduler config (`num_train_timesteps`, `beta_schedule`, `beta_start`, `beta_end`)."""
        return cls.make(
            config.get("beta_schedule", "linear"),
            int(config.get("num_train_timesteps", 1000)),
            config.get("beta_start"),
            config.get("beta_end"),
        )

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def log_snr(self) -> torch.Tensor:
        return log_snr_from_alphas_cumprod(self.alphas_cumprod)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) for integer timesteps t; broadcast to `like`'s rank and dtype when given."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        if like is not None:
            shape = (-1,) + (1,) * (like.ndim - 1)
            alpha = alpha.reshape(shape).to(like.dtype)
            sigma = sigma.reshape(shape).to(like.dtype)
        return alpha, sigma

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return snr_from_alphas_cumprod(self.alphas_cumprod.to(t.device)[t.long()])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0): x_t = α_t x_0 + σ_t ε (DDPM Eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, like=x0)
        return alpha * x0 + sigma * noise

    def timesteps_from_log_snr(self, log_snr: torch.Tensor, discrete: bool = True) -> torch.Tensor:
        """Map logSNR values onto this schedule's time axis.

        λ_t decreases in t, so λ ↦ t is monotone. `discrete=True` returns the integer timestep whose λ_t is
        nearest (in λ); `discrete=False` interpolates linearly in λ between neighbouring timesteps and returns a
        float t ∈ [0, T−1]. Values outside the schedule's range clamp to its ends.
        """
        table = self.log_snr.to(log_snr.device)  # decreasing
        flipped = table.flip(0)  # increasing, index j ↔ t = T−1−j
        lam = log_snr.to(torch.float64).clamp(flipped[0], flipped[-1])
        hi = torch.searchsorted(flipped, lam).clamp(1, len(flipped) - 1)
        lo = hi - 1
        frac = (lam - flipped[lo]) / (flipped[hi] - flipped[lo])
        j = lo.to(torch.float64) + frac
        if discrete:
            j = torch.where(frac < 0.5, lo, hi).to(torch.float64)
        t = (self.num_timesteps - 1) - j
        return t.round().long() if discrete else t


def predicted_x0_eps(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output to (x̂_0, ε̂) given x_t = α x_0 + σ ε.

    ε-prediction: x̂_0 = (x_t − σ ε̂)/α (DDIM Eq. 9); x0-prediction: ε̂ = (x_t − α x̂_0)/σ;
    v-prediction (Salimans & Ho 2022, §4 / App. D): v = α ε − σ x_0, so x̂_0 = α x_t − σ v̂, ε̂ = σ x_t + α v̂.
    """
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (x_t - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output
    raise PrefalignError(f"unknown prediction_type '{prediction_type}'; known: {', '.join(PREDICTION_TYPES)}")


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The regression target of a network with this parameterisation: ε, x_0 or v = α ε − σ x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * x0
    raise PrefalignError(f"unknown prediction_type '{prediction_type}'; known: {', '.join(PREDICTION_TYPES)}")
