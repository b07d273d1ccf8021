"""A weighted sum of rewards is itself a reward (`"0.5*hpsv2.1+aesthetic"` in the registry).

Components keep their own conventions and scales, so weights are the user's calibration: e.g. HPS cosines are
~0.3 while aesthetic scores are ~5, and `0.5*hpsv2.1+aesthetic` is dominated by the aesthetic term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefalign.errors import PrefalignError
from prefalign.rewards.base import ImageLike, RewardInfo, RewardModel


def format_term(weight: float, name: str) -> str:
    return name if weight == 1.0 else f"{weight:g}*{name}"


class WeightedSumReward(RewardModel):
    """sum_i w_i * r_i(image, prompt), on both the no-grad and the differentiable path."""

    def __init__(self, terms: Sequence[tuple[float, RewardModel]]) -> None:
        super().__init__()
        if not terms:
            raise PrefalignError("a combined reward needs at least one term")
        directions = {r.higher_is_better for _, r in terms}
        if len(directions) != 1:
            raise PrefalignError("cannot add rewards where higher is better to rewards where lower is better")
        self.weights = [float(w) for w, _ in terms]
        self.rewards = torch.nn.ModuleList([r for _, r in terms])
        names = [format_term(w, r.name) for w, r in terms]
        self.info = RewardInfo(
            name="+".join(names),
            version="; ".join(f"{r.name}: {r.version}" for r in self.rewards),
            higher_is_better=directions.pop(),
            input_size=None,
            convention="weighted sum of: "
            + "; ".join(f"{n} [{r.convention}]" for n, r in zip(names, self.rewards, strict=True)),
        )

    @torch.no_grad()
    def score(
        self, images: Sequence[ImageLike], prompts: Sequence[str], batch_size: int = 16
    ) -> torch.Tensor:
        total = torch.zeros(len(images))
        for weight, reward in zip(self.weights, self.rewards, strict=True):
            total += weight * reward.score(images, prompts, batch_size=batch_size).float().cpu()
        return total

    def differentiable(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        terms = [
            w * r.differentiable(images, prompts).float()
            for w, r in zip(self.weights, self.rewards, strict=True)
        ]
        return torch.stack(terms).sum(0)
