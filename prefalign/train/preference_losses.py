"""Preference losses for reward models: Bradley–Terry, ties, Plackett–Luce, per-prompt weights, accuracy.

Every pairwise loss takes the scaled score difference Δ = (r_0 − r_1) / T of a scorer's raw outputs (PickScore's
logit_scale·cos, or a head's output) and label_0 ∈ {0, 0.5, 1} (Pick-a-Pic: 1 = image 0 preferred, 0.5 = tie),
and returns the weighted mean over the batch. Weights are per pair (e.g. `prompt_weights`, 1/n per prompt as in
PickScore); a weighted mean divides by the weights of the pairs the loss uses, so a loss that ignores ties is not
diluted by them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from prefalign.errors import PrefalignError

PairwiseKind = Literal["bt", "soft", "btt"]
PAIRWISE_KINDS: tuple[str, ...] = ("bt", "soft", "btt")


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w·v / Σ w (the plain mean without weights); 0 when every weight is 0, so an all-tie batch adds nothing."""
    if weight is None:
        return values.mean()
    weight = weight.to(values)
    return (weight * values).sum() / weight.sum().clamp_min(torch.finfo(values.dtype).tiny)


def prompt_weights(captions: Sequence[str]) -> torch.Tensor:
    """1 / (number of pairs with the same caption) per pair: PickScore's per-prompt weighting
    (trainer/criterions/clip_criterion.py, `num_examples_per_prompt`), so prompts with many pairs do not dominate."""
    counts: dict[str, int] = {}
    for caption in captions:
        counts[caption] = counts.get(caption, 0) + 1
    return torch.tensor([1.0 / counts[c] for c in captions])


def bt_loss(delta: torch.Tensor, label_0: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood −log σ(Δ_winner − Δ_loser) on decided pairs; ties are dropped.

    The loss of ImageReward (train.py `loss_func`, a 2-way cross-entropy) and TRL's RewardTrainer; HPSv3's `bt`
    masks ties the same way.
    """
    decided = (label_0 != 0.5).to(delta)
    signed = torch.where(label_0 > 0.5, delta, -delta)
    weight = decided if weight is None else weight.to(delta) * decided
    return weighted_mean(-F.logsigmoid(signed), weight)


def soft_label_loss(delta: torch.Tensor, label_0: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """PickScore's loss (trainer/criterions/clip_criterion.py): the 2-way cross-entropy against the soft target
    (label_0, 1 − label_0), minus the target's entropy so that the ideal loss is 0 — for a 0.5/0.5 tie that is the
    official `+ log 0.5` correction; decided pairs reduce to `bt_loss`. Equals KL(label ‖ σ(Δ))."""
    label_0 = label_0.to(delta)
    cross_entropy = -(label_0 * F.logsigmoid(delta) + (1 - label_0) * F.logsigmoid(-delta))
    entropy = -(torch.xlogy(label_0, label_0) + torch.xlogy(1 - label_0, 1 - label_0))
    return weighted_mean(cross_entropy - entropy, weight)


def bt_ties_loss(
    delta: torch.Tensor, label_0: torch.Tensor, log_theta: torch.Tensor | float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley–Terry with ties (Rao & Kupper 1967; HPSv3 `btt`, hpsv3/model/qwen2vl_trainer.py), θ > 1:

        P(0 ≻ 1) = σ(Δ − log θ),   P(1 ≻ 0) = σ(−Δ − log θ),   P(tie) = (θ² − 1)·σ(Δ − log θ)·σ(−Δ − log θ)

    The three probabilities sum to 1; θ → 1 recovers Bradley–Terry without ties.
    """
    log_theta = torch.as_tensor(log_theta, dtype=delta.dtype, device=delta.device)
    if bool((log_theta <= 0).any()):
        raise PrefalignError(f"bt_ties_loss: θ must be > 1 (got log θ = {float(log_theta.min()):.3g})")
    win, lose = F.logsigmoid(delta - log_theta), F.logsigmoid(-delta - log_theta)
    log_tie_factor = torch.log(torch.expm1(2 * log_theta))  # log(θ² − 1)
    nll = torch.where(label_0 == 0.5, -(win + lose + log_tie_factor), torch.where(label_0 > 0.5, -win, -lose))
    return weighted_mean(nll, weight)


def plackett_luce_loss(
    scores: torch.Tensor, ranks: torch.Tensor, top_k: int | None = None, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Listwise Plackett–Luce negative log-likelihood for groups of candidates of one prompt.

    `scores` [G, K]; `ranks` [G, K] integer places (0 = best; equal places are ties; −1 marks padding of groups
    with fewer than K candidates). log P(order) = Σ_i [s_(i) − logsumexp_{j ≥ i} s_(j)] over the first `top_k`
    places (None: all). Tied candidates are each drawn from the set that still holds all of them (Breslow's tie
    rule of the Cox partial likelihood, which is this likelihood), so a tie of two pulls their scores together.
    top_k = 1 is HPSv2's `PreferenceLoss` (cross-entropy of the best candidate over the group,
    hpsv2/src/open_clip/loss.py); K = 2 is Bradley–Terry, −log σ(s_w − s_l), and a tied pair of two
    −log σ(Δ) − log σ(−Δ).
    """
    if scores.shape != ranks.shape or scores.ndim != 2:
        raise PrefalignError(f"plackett_luce_loss: scores {tuple(scores.shape)} and ranks must both be [G, K]")
    valid = ranks >= 0
    # Sort each group best-first; padding goes last and is pushed out of every normaliser by a very low (finite,
    # so that logcumsumexp's backward stays finite) score.
    keys, order = torch.where(valid, ranks, ranks.max() + 1).sort(dim=1, stable=True)
    places = valid.gather(1, order)
    sorted_scores = scores.gather(1, order).masked_fill(~places, torch.finfo(scores.dtype).min / 4)
    # logsumexp over the suffix j ≥ i: a reversed cumulative logsumexp, taken from the first place of i's tie.
    suffix = sorted_scores.flip(1).logcumsumexp(dim=1).flip(1)
    first = (keys.unsqueeze(1) < keys.unsqueeze(2)).sum(2)  # candidates strictly better than each one
    if top_k is not None:
        places = places & (first < top_k)
    terms = torch.where(places, sorted_scores - suffix.gather(1, first), torch.zeros_like(scores))
    return weighted_mean(-terms.sum(1), weight)


def pairwise_accuracy(r0: torch.Tensor, r1: torch.Tensor, label_0: torch.Tensor) -> float:
    """Share of decided pairs (label_0 ≠ 0.5; ties in the label are excluded) where the scorer prefers the
    labelled winner; equal scores count half. NaN when no pair is decided."""
    decided = label_0 != 0.5
    if not bool(decided.any()):
        return math.nan
    signed = torch.where(label_0 > 0.5, r0 - r1, r1 - r0)[decided]
    return float(((signed > 0).float() + 0.5 * (signed == 0).float()).mean())


class _Tempered(nn.Module):
    """Scores divided by a fixed or learnable temperature T (learned as log T)."""

    def __init__(self, temperature: float, learn_temperature: bool) -> None:
        super().__init__()
        if temperature <= 0:
            raise PrefalignError(f"loss.temperature must be > 0 (got {temperature})")
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.detach().exp())


class PlackettLuceLoss(_Tempered):
    """`plackett_luce_loss` of scores / T over the first `top_k` places of each ranking (None: all of them)."""

    def __init__(self, temperature: float = 1.0, learn_temperature: bool = False, top_k: int | None = None) -> None:
        super().__init__(temperature, learn_temperature)
        if top_k is not None and top_k < 1:
            raise PrefalignError(f"loss.top_k must be ≥ 1 or null for the whole ranking (got {top_k})")
        self.top_k = top_k

    def forward(self, scores: torch.Tensor, ranks: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return plackett_luce_loss(scores / self.log_temperature.exp(), ranks, self.top_k, weight)


class PreferenceLoss(_Tempered):
    """A pairwise loss with its own parameters: Δ = (r_0 − r_1) / T with a fixed or learnable temperature T
    (learned as log T), and for `btt` a fixed or learnable tie parameter θ (θ = 1 + exp(ρ), so θ > 1).

    kind: "bt" (`bt_loss`, ties dropped), "soft" (`soft_label_loss`, PickScore), "btt" (`bt_ties_loss`); ranked
    groups take `PlackettLuceLoss`.
    """

    def __init__(
        self,
        kind: str = "soft",
        temperature: float = 1.0,
        learn_temperature: bool = False,
        tie_theta: float = 5.0,  # HPSv3's default k
        learn_tie_theta: bool = False,
    ) -> None:
        if kind not in PAIRWISE_KINDS:
            raise PrefalignError(f"loss.kind '{kind}' is unknown; use one of {', '.join(PAIRWISE_KINDS)} (pairs) or "
                                 "plackett_luce (ranked groups)")
        if tie_theta <= 1:
            raise PrefalignError(f"loss.tie_theta must be > 1 (got {tie_theta})")
        super().__init__(temperature, learn_temperature)
        self.kind = kind
        # θ only enters btt; a parameter that never gets a gradient would stall DDP's gradient averaging.
        self.tie_rho = nn.Parameter(torch.tensor(math.log(tie_theta - 1)), requires_grad=learn_tie_theta and kind == "btt")

    @property
    def tie_theta(self) -> float:
        return float(1 + self.tie_rho.detach().exp())

    def forward(
        self, r0: torch.Tensor, r1: torch.Tensor, label_0: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        delta = (r0 - r1) / self.log_temperature.exp()
        if self.kind == "bt":
            return bt_loss(delta, label_0, weight)
        if self.kind == "soft":
            return soft_label_loss(delta, label_0, weight)
        return bt_ties_loss(delta, label_0, F.softplus(self.tie_rho), weight)  # log θ = log(1 + e^ρ)
