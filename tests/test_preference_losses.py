"""Preference losses against closed-form cases: Bradley–Terry, soft labels, BT with ties, Plackett–Luce, weights."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.train.preference_losses import (
    PlackettLuceLoss,
    PreferenceLoss,
    bt_loss,
    bt_ties_loss,
    pairwise_accuracy,
    plackett_luce_loss,
    prompt_weights,
    soft_label_loss,
    weighted_mean,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bt_loss_closed_form_and_ties_dropped() -> None:
    delta = torch.tensor([2.0, 2.0, 0.7])
    assert float(bt_loss(delta[:1], torch.tensor([1.0]))) == pytest.approx(softplus(-2.0))
    assert float(bt_loss(delta[:1], torch.tensor([0.0]))) == pytest.approx(softplus(2.0))
    # The tie (third pair) neither adds loss nor dilutes the mean.
    both = bt_loss(delta, torch.tensor([1.0, 0.0, 0.5]))
    assert float(both) == pytest.approx((softplus(-2.0) + softplus(2.0)) / 2)
    assert float(bt_loss(delta, torch.full((3,), 0.5))) == 0.0


def test_soft_label_loss_is_pickscore_with_log_half_correction() -> None:
    d = 0.8
    tie = soft_label_loss(torch.tensor([d]), torch.tensor([0.5]))
    # PickScore: 0.5·CE(→0) + 0.5·CE(→1) + log 0.5
    expected = 0.5 * softplus(-d) + 0.5 * softplus(d) + math.log(0.5)
    assert float(tie) == pytest.approx(expected)
    assert float(soft_label_loss(torch.tensor([0.0]), torch.tensor([0.5]))) == pytest.approx(0.0, abs=1e-7)
    decided = torch.tensor([1.5, -0.3]), torch.tensor([1.0, 0.0])
    assert float(soft_label_loss(*decided)) == pytest.approx(float(bt_loss(*decided)))


def test_bt_ties_probabilities_sum_to_one_and_reduce_to_bt() -> None:
    delta = torch.linspace(-3, 3, 13)
    for theta in (1.5, 5.0):
        log_theta = math.log(theta)
        probs = [torch.exp(-torch.stack([bt_ties_loss(d[None], torch.tensor([lab]), log_theta) for d in delta]))
                 for lab in (1.0, 0.0, 0.5)]
        assert torch.allclose(sum(probs), torch.ones(13), atol=1e-6)
        # At Δ = 0: P(tie) = (θ² − 1)/(1 + θ)² = (θ − 1)/(θ + 1).
        assert float(probs[2][6]) == pytest.approx((theta - 1) / (theta + 1), rel=1e-6)
    near_one = bt_ties_loss(torch.tensor([0.9]), torch.tensor([1.0]), 1e-6)
    assert float(near_one) == pytest.approx(softplus(-0.9), rel=1e-4)
    with pytest.raises(PrefalignError, match="θ"):
        bt_ties_loss(delta, torch.ones(13), 0.0)


def test_plackett_luce_closed_form_padding_and_pairs() -> None:
    a, b, c = 1.2, 0.3, -0.5
    scores = torch.tensor([[b, c, a]])
    ranks = torch.tensor([[1, 2, 0]])
    log_p = (a - math.log(math.exp(a) + math.exp(b) + math.exp(c))) + (b - math.log(math.exp(b) + math.exp(c)))
    assert float(plackett_luce_loss(scores, ranks)) == pytest.approx(-log_p)
    top1 = a - math.log(math.exp(a) + math.exp(b) + math.exp(c))
    assert float(plackett_luce_loss(scores, ranks, top_k=1)) == pytest.approx(-top1)
    # A padded group of two equals the Bradley–Terry loss, and its gradients stay finite.
    padded = torch.tensor([[0.4, -9.0, 1.0]], requires_grad=True)
    loss = plackett_luce_loss(padded, torch.tensor([[1, -1, 0]]))
    assert float(loss.detach()) == pytest.approx(float(bt_loss(torch.tensor([0.6]), torch.tensor([1.0]))))
    loss.backward()
    assert torch.isfinite(padded.grad).all() and padded.grad[0, 1] == 0
    with pytest.raises(PrefalignError, match=r"\[G, K\]"):
        plackett_luce_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def test_plackett_luce_on_groups_of_two_is_bradley_terry_at_the_same_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    r0, r1 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    label_0 = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    ranks = torch.stack([1 - label_0, label_0], 1).long()  # image 0 preferred ⇔ image 0 ranks first
    weight = prompt_weights(["a", "a", "b", "c", "c", "c"])
    for temperature in (1.0, 0.3):
        listwise = PlackettLuceLoss(temperature)(torch.stack([r0, r1], 1), ranks, weight)
        pairwise = PreferenceLoss("bt", temperature)(r0, r1, label_0, weight)
        assert float(listwise) == pytest.approx(float(pairwise), rel=1e-6)
    # top_k = 1 of a group of two is the whole ranking; a learnable temperature gets a gradient.
    loss = PlackettLuceLoss(0.5, learn_temperature=True, top_k=1)
    loss(torch.stack([r0, r1], 1), ranks).backward()
    assert loss.log_temperature.grad is not None and loss.log_temperature.grad != 0
    with pytest.raises(PrefalignError, match=r"loss\.top_k"):
        PlackettLuceLoss(top_k=0)
    with pytest.raises(PrefalignError, match=r"loss\.temperature"):
        PlackettLuceLoss(temperature=0.0)


def test_per_prompt_weights_and_weighted_mean() -> None:
    weights = prompt_weights(["a", "b", "a", "a"])
    assert weights.tolist() == pytest.approx([1 / 3, 1.0, 1 / 3, 1 / 3])
    values = torch.tensor([3.0, 1.0, 3.0, 3.0])
    assert float(weighted_mean(values, weights)) == pytest.approx(2.0)  # each prompt counts once
    delta = torch.tensor([1.0, -2.0, 1.0, 1.0])
    expected = (softplus(-1.0) + softplus(-2.0)) / 2
    assert float(bt_loss(delta, torch.tensor([1.0, 0.0, 1.0, 1.0]), weights)) == pytest.approx(expected)


def test_pairwise_accuracy_excludes_label_ties_and_halves_score_ties() -> None:
    r0, r1 = torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert pairwise_accuracy(r0, r1, torch.tensor([1.0, 1.0, 1.0, 0.5])) == pytest.approx(0.5)  # (1 + 0 + ½)/3
    assert math.isnan(pairwise_accuracy(r0, r1, torch.full((4,), 0.5)))


def test_learnable_temperature_and_tie_theta_recover_the_generating_values() -> None:
    """Maximum likelihood on labels drawn from the model itself returns its parameters (n = 40k)."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(40000, generator=g) * 2
    true_t, true_theta = 0.5, 2.0
    u = torch.rand(40000, generator=g)
    p_win = torch.sigmoid(r / true_t - math.log(true_theta))
    p_lose = torch.sigmoid(-r / true_t - math.log(true_theta))
    labels = torch.where(u < p_win, 1.0, torch.where(u < p_win + p_lose, 0.0, 0.5))
    loss = PreferenceLoss("btt", temperature=1.0, learn_temperature=True, tie_theta=4.0, learn_tie_theta=True)
    optimizer = torch.optim.LBFGS(loss.parameters(), lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss(r, torch.zeros_like(r), labels)
        value.backward()
        return value

    optimizer.step(closure)
    assert loss.temperature == pytest.approx(true_t, rel=0.05)
    assert loss.tie_theta == pytest.approx(true_theta, rel=0.05)
    fixed = PreferenceLoss("bt", temperature=2.0)
    assert not any(p.requires_grad for p in fixed.parameters())
    assert float(fixed(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0]))) == pytest.approx(softplus(-1))
    with pytest.raises(PrefalignError, match=r"loss\.kind"):
        PreferenceLoss("hinge")
