"""Noise schedules over one time axis for both families: VP (a diffusers ᾱ table) and rectified flow.

Notation (Kingma et al. 2021, "Variational Diffusion Models"): x_t = α_t·x_0 + σ_t·ε, SNR(t) = α_t²/σ_t²,
λ_t = log SNR(t). VP: α_t² + σ_t² = 1, ᾱ_t = α_t² ("alphas_cumprod"), t ∈ [0, T−1] indexes the table (integer t
reads it, float t interpolates in λ). Rectified flow (SD3 / FLUX): α = 1 − σ, t = σ·T, the timestep the
networks receive. Both expose `alpha_sigma`, `snr`, `add_noise`, `timesteps_from_log_snr` and
`timesteps_from_fraction`, so losses, timestep samplers and trainers do not care which family they serve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from prefalign.diffusion.conversions import PREDICTION_TYPES, predicted_x0_eps, training_target
from prefalign.errors import PrefalignError

# The parameterisation conversions live in `conversions`; re-exported here for existing callers.
__all__ = ["PREDICTION_TYPES", "NoiseSchedule", "predicted_x0_eps", "training_target"]


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
    kind: ClassVar[str] = "vp"

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

    def alphas_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at timesteps t: the table at integer t; between entries, linear interpolation in λ (float64)."""
        table = self.alphas_cumprod.to(t.device)
        if not t.is_floating_point():
            return table[t.long()]
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        frac = t - lo
        lam = log_snr_from_alphas_cumprod(table)
        between = alphas_cumprod_from_log_snr(lam[lo] + frac * (lam[hi] - lam[lo]))
        return torch.where(frac == 0, table[lo], between)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) at timesteps t; broadcast to `like`'s rank and dtype when given."""
        abar = self.alphas_cumprod_at(t)
        return _shaped(abar.sqrt(), (1 - abar).sqrt(), like)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return snr_from_alphas_cumprod(self.alphas_cumprod_at(t))

    def timesteps_from_fraction(self, u: torch.Tensor, discrete: bool = True) -> torch.Tensor:
        """Map u ∈ [0, 1) (0 = clean, 1 = pure noise) onto the axis: ⌊u·T⌋, or u·(T−1) with `discrete=False`."""
        T = self.num_timesteps
        return (u * T).floor().clamp(max=T - 1).long() if discrete else u * (T - 1)

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



def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift (Esser et al. 2024, §5.3.2): σ ↦ s·σ / (1 + (s − 1)·σ)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: torch.Tensor, mu: float, kind: str = "exponential") -> torch.Tensor:
    """FLUX's resolution-dependent shift (diffusers `time_shift`, power 1): a static shift by e^μ, or by μ
    with `kind="linear"`."""
    return shift_sigmas(sigmas, math.exp(mu) if kind == "exponential" else mu)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """μ of FluxPipeline's `calculate_shift`: linear in the packed latent length, (256 → 0.5), (4096 → 1.15)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


# FlowMatchEulerDiscreteScheduler options this schedule does not reproduce: refused, never silently ignored.
_UNSUPPORTED_FLOW_OPTIONS = (
    "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "stochastic_sampling",
)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow x_σ = (1 − σ)·x_0 + σ·ε (Liu et al. 2023; SD3 / FLUX), on the axis t = σ·T.

    The training table is diffusers' FlowMatchEulerDiscreteScheduler's: σ_i = shift((i + 1)/T), i = 0..T−1,
    unshifted when the shift is resolution-dependent (`dynamic`, FLUX.1-dev), where sampling takes μ instead.
    """

    num_timesteps: int = 1000
    shift: float = 1.0
    dynamic: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    kind: ClassVar[str] = "flow"

    @classmethod
    def from_diffusers_config(cls, config: dict) -> FlowSchedule:
        """Read a FlowMatchEulerDiscreteScheduler config (SD3: shift 3; FLUX.1-dev: dynamic shifting)."""
        for key in _UNSUPPORTED_FLOW_OPTIONS:
            if config.get(key):
                raise PrefalignError(
                    f"scheduler_config.json sets {key}, which prefalign's FlowSchedule does not support; "
                    "remove it or use a checkpoint without it"
                )
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise PrefalignError(f"scheduler_config.json: time_shift_type '{kind}' is not exponential or linear")
        defaults = cls()
        return cls(
            int(config.get("num_train_timesteps", 1000)), float(config.get("shift", 1.0)),
            bool(config.get("use_dynamic_shifting", False)),
            *(config.get(k, getattr(defaults, k)) for k in (
                "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")),
            kind,
        )

    def diffusers_config(self) -> dict:
        """The FlowMatchEulerDiscreteScheduler config that reproduces this schedule."""
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": self.num_timesteps,
            "shift": self.shift, "use_dynamic_shifting": self.dynamic, "base_shift": self.base_shift,
            "max_shift": self.max_shift, "base_image_seq_len": self.base_image_seq_len,
            "max_image_seq_len": self.max_image_seq_len, "time_shift_type": self.time_shift_type,
        }

    @property
    def sigmas(self) -> torch.Tensor:
        """The training table σ_i, i = 0..T−1 (increasing, float64)."""
        T = self.num_timesteps
        sigmas = torch.arange(1, T + 1, dtype=torch.float64) / T
        return sigmas if self.dynamic else shift_sigmas(sigmas, self.shift)

    @property
    def log_snr(self) -> torch.Tensor:
        """λ_i = 2·log((1 − σ_i)/σ_i) over the table (−∞ at σ = 1)."""
        return log_snr_from_sigmas(self.sigmas)

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64) / self.num_timesteps

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 − σ, σ) with σ = t/T; broadcast to `like`'s rank and dtype when given."""
        sigma = self.sigma_at(t)
        return _shaped(1 - sigma, sigma, like)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR = ((1 − σ)/σ)²."""
        sigma = self.sigma_at(t)
        return ((1 - sigma) / sigma) ** 2

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_σ = (1 − σ)·x_0 + σ·ε (diffusers `scale_noise`)."""
        alpha, sigma = self.alpha_sigma(t, like=x0)
        return alpha * x0 + sigma * noise

    def timesteps_from_fraction(self, u: torch.Tensor, discrete: bool = True) -> torch.Tensor:
        """u ∈ [0, 1) (0 = clean) ↦ t = σ·T: the table entry ⌊u·T⌋ (as diffusers' training scripts index it),
        or σ = shift(u) with `discrete=False`."""
        if discrete:
            index = (u * self.num_timesteps).floor().clamp(max=self.num_timesteps - 1).long()
            return self.sigmas.to(u.device)[index] * self.num_timesteps
        sigma = u.to(torch.float64) if self.dynamic else shift_sigmas(u.to(torch.float64), self.shift)
        return sigma * self.num_timesteps

    def timesteps_from_log_snr(self, log_snr: torch.Tensor, discrete: bool = True) -> torch.Tensor:
        """λ ↦ σ = sigmoid(−λ/2), t = σ·T; `discrete=True` takes the table entry nearest in λ."""
        sigma = torch.sigmoid(-log_snr.to(torch.float64) / 2)
        if discrete:
            table, lam_table = self.sigmas.to(sigma.device), self.log_snr.to(sigma.device)
            hi = torch.searchsorted(table, sigma).clamp(1, len(table) - 1)
            lo = hi - 1
            lam = log_snr.to(torch.float64)
            closer_lo = (lam - lam_table[lo]).abs() <= (lam_table[hi] - lam).abs()
            sigma = torch.where(closer_lo, table[lo], table[hi])
        return sigma * self.num_timesteps

    def sampling_sigmas(
        self, num_steps: int, spacing: str = "linspace", mu: float | None = None
    ) -> torch.Tensor:
        """The inference grid of FlowMatchEulerDiscreteScheduler.set_timesteps, with the final σ = 0 appended.

        `linspace` (the scheduler's own, SD3Pipeline): linspace(σ_max, σ_min, n) of the table, shifted again
        (so SD3's last non-zero σ is 0.0089); `flux` (FluxPipeline): linspace(1, 1/n, n), shifted. A dynamic
        schedule needs μ (`flux_mu` of the packed latent length).
        """
        if num_steps < 1:
            raise PrefalignError(f"num_steps={num_steps} must be at least 1")
        table = self.sigmas
        if spacing == "linspace":
            sigmas = torch.linspace(float(table[-1]), float(table[0]), num_steps, dtype=torch.float64)
        elif spacing == "flux":
            sigmas = torch.linspace(1.0, 1 / num_steps, num_steps, dtype=torch.float64)
        else:
            raise PrefalignError(f"unknown flow sigma spacing '{spacing}'; use linspace or flux")
        if self.dynamic:
            if mu is None:
                raise PrefalignError("this flow schedule shifts by resolution (use_dynamic_shifting): pass mu")
            sigmas = time_shift(sigmas, mu, self.time_shift_type)
        else:
            sigmas = shift_sigmas(sigmas, self.shift)
        return torch.cat([sigmas, sigmas.new_zeros(1)])


def log_snr_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Rectified-flow λ = 2·log((1 − σ)/σ)."""
    return 2 * (torch.log1p(-sigmas) - torch.log(sigmas))


Schedule = NoiseSchedule | FlowSchedule


def schedule_from_config(config: dict) -> tuple[Schedule, str]:
    """(schedule, prediction_type) of a diffusers scheduler config.

    FlowMatchEulerDiscreteScheduler (SD3, FLUX) and flow-sigma solvers (`use_flow_sigmas`, SANA) give a
    FlowSchedule with the velocity parameterisation; every other scheduler a VP table (trained_betas or a named β
    schedule). Zero-terminal-SNR rescaling (Lin et al. 2024) is refused rather than silently ignored.
    """
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return FlowSchedule.from_diffusers_config(config), "flow_prediction"
    if config.get("use_flow_sigmas"):
        flow = FlowSchedule(int(config.get("num_train_timesteps", 1000)), float(config.get("flow_shift") or 1.0))
        return flow, "flow_prediction"
    if config.get("rescale_betas_zero_snr"):
        raise PrefalignError(
            "scheduler_config.json sets rescale_betas_zero_snr, which prefalign's NoiseSchedule does not "
            "support; use a model trained without zero terminal SNR"
        )
    if config.get("trained_betas") is not None:
        schedule = NoiseSchedule.from_betas(torch.tensor(config["trained_betas"], dtype=torch.float64))
    else:
        schedule = NoiseSchedule.from_diffusers_config(config)
    prediction_type = config.get("prediction_type") or "epsilon"
    if prediction_type not in PREDICTION_TYPES or prediction_type == "flow_prediction":
        known = ", ".join(PREDICTION_TYPES[:3])
        raise PrefalignError(f"scheduler_config.json: prediction_type '{prediction_type}' is not in {known}")
    return schedule, prediction_type


def same_schedule(a: Schedule, b: Schedule) -> bool:
    """True when two schedules define the same noise levels."""
    if isinstance(a, FlowSchedule) or isinstance(b, FlowSchedule):
        return a == b
    return a.num_timesteps == b.num_timesteps and torch.allclose(a.alphas_cumprod, b.alphas_cumprod)


def _shaped(
    alpha: torch.Tensor, sigma: torch.Tensor, like: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if like is None:
        return alpha, sigma
    shape = (-1,) + (1,) * (like.ndim - 1)
    return alpha.reshape(shape).to(like.dtype), sigma.reshape(shape).to(like.dtype)
