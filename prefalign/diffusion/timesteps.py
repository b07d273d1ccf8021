"""Training-timestep samplers, mapped onto the model's own schedule (VP or rectified flow).

- `uniform`: t ~ U{0..T−1} (DDPM Algorithm 1).
- `logit-normal`: t/T = sigmoid(m + s·n), n ~ N(0, 1) (Esser et al. 2024, SD3 §3.1).
- `laplace` / `cauchy`: importance sampling of logSNR λ (Hang et al. 2024, "Improved Noise Schedule for
  Diffusion Training"): λ is drawn from a Laplace(μ, b) or Cauchy(μ, γ) density by its inverse CDF and mapped to
  the timestep whose λ_t matches, so training concentrates around λ ≈ μ. For rectified flow λ = 2·log((1−σ)/σ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prefalign.diffusion.schedules import Schedule
from prefalign.errors import PrefalignError

TIMESTEP_SAMPLERS = ("uniform", "logit-normal", "laplace", "cauchy")
_EPS = 1e-6  # keeps inverse CDFs finite at u ∈ {0, 1}


def laplace_log_snr(u: torch.Tensor, mu: float = 0.0, b: float = 0.5) -> torch.Tensor:
    """λ(u) = μ − b·sgn(0.5 − u)·log(1 − 2|u − 0.5|): the inverse CDF of Laplace(μ, b) (Hang et al. 2024)."""
    return mu - b * torch.sign(0.5 - u) * torch.log1p(-2 * (u - 0.5).abs())


def cauchy_log_snr(u: torch.Tensor, mu: float = 0.0, gamma: float = 1.0) -> torch.Tensor:
    """λ(u) = μ + γ·tan(π(u − 0.5)): the inverse CDF of Cauchy(μ, γ) (Hang et al. 2024, Cauchy variant)."""
    return mu + gamma * torch.tan(math.pi * (u - 0.5))


@dataclass(frozen=True)
class TimestepSampler:
    """Draw training timesteps. `loc`/`scale`: μ and b (laplace), μ and γ (cauchy), m and s (logit-normal)."""

    kind: str = "uniform"
    loc: float = 0.0
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in TIMESTEP_SAMPLERS:
            raise PrefalignError(f"unknown timestep sampler '{self.kind}'; known: {', '.join(TIMESTEP_SAMPLERS)}")

    @property
    def resolved_scale(self) -> float:
        """Defaults: b = 0.5 (Laplace, the paper's ImageNet-256 setting), γ = 1 (Cauchy), s = 1 (logit-normal)."""
        if self.scale is not None:
            return self.scale
        return {"laplace": 0.5, "cauchy": 1.0}.get(self.kind, 1.0)

    def sample_log_snr(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """λ samples for the logSNR samplers (float64)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64).clamp(_EPS, 1 - _EPS)
        if self.kind == "laplace":
            return laplace_log_snr(u, self.loc, self.resolved_scale)
        if self.kind == "cauchy":
            return cauchy_log_snr(u, self.loc, self.resolved_scale)
        raise PrefalignError(f"timestep sampler '{self.kind}' does not sample logSNR")

    def log_snr_density(self, log_snr: torch.Tensor) -> torch.Tensor:
        """The closed-form density p(λ) the logSNR samplers draw from."""
        x = (log_snr - self.loc) / self.resolved_scale
        if self.kind == "laplace":
            return torch.exp(-x.abs()) / (2 * self.resolved_scale)
        if self.kind == "cauchy":
            return 1 / (math.pi * self.resolved_scale * (1 + x**2))
        raise PrefalignError(f"timestep sampler '{self.kind}' has no logSNR density")

    def __call__(
        self,
        n: int,
        schedule: Schedule,
        generator: torch.Generator | None = None,
        discrete: bool = True,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """n timesteps on `schedule`'s axis: VP integers in [0, T−1] (floats with `discrete=False`), or flow
        t = σ·T on the training table (any σ with `discrete=False`)."""
        if self.kind in ("laplace", "cauchy"):
            t = schedule.timesteps_from_log_snr(self.sample_log_snr(n, generator), discrete=discrete)
            return t.to(device)
        if self.kind == "uniform":
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        else:  # logit-normal: the noise fraction u (σ before the shift, for flow) is sigmoid(m + s·n)
            normal = torch.randn(n, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(self.loc + self.resolved_scale * normal)
        return schedule.timesteps_from_fraction(u, discrete).to(device)
