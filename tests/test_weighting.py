"""Min-SNR-γ and friends against the closed forms of Hang et al. 2023 and diffusers' --snr_gamma."""

import pytest
import torch

from prefalign.diffusion.schedules import NoiseSchedule
from prefalign.diffusion.weighting import loss_weight
from prefalign.errors import PrefalignError

SNR = torch.tensor([0.01, 0.5, 1.0, 5.0, 20.0, 1e4], dtype=torch.float64)


def test_min_snr_closed_forms():
    g = 5.0
    torch.testing.assert_close(loss_weight(SNR, "min_snr", "sample", g), torch.minimum(SNR, torch.tensor(g)))
    torch.testing.assert_close(loss_weight(SNR, "min_snr", "epsilon", g), torch.clamp(g / SNR, max=1.0))
    torch.testing.assert_close(loss_weight(SNR, "min_snr", "v_prediction", g), torch.minimum(SNR, torch.tensor(g)) / (SNR + 1))


def test_min_snr_matches_diffusers_train_text_to_image():
    """diffusers: mse_loss_weights = stack([snr, γ·1]).min(dim=1)[0] / snr (ε) or / (snr + 1) (v)."""
    schedule = NoiseSchedule.make("scaled_linear")
    t = torch.tensor([0, 50, 300, 600, 999])
    snr = schedule.snr(t)
    base = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(loss_weight(snr, "min_snr", "epsilon"), base / snr)
    torch.testing.assert_close(loss_weight(snr, "min_snr", "v_prediction"), base / (snr + 1))


def test_snr_weighting_is_plain_eps_mse_and_uniform_is_one():
    torch.testing.assert_close(loss_weight(SNR, "snr", "epsilon"), torch.ones_like(SNR))
    torch.testing.assert_close(loss_weight(SNR, "snr", "sample"), SNR)
    torch.testing.assert_close(loss_weight(SNR, "uniform", "v_prediction"), torch.ones_like(SNR))


def test_zero_snr_gets_unit_weight_and_bad_names_fail():
    assert float(loss_weight(torch.zeros(1), "min_snr", "epsilon")) == 1.0
    with pytest.raises(PrefalignError, match="known: uniform"):
        loss_weight(SNR, "p2")
    with pytest.raises(PrefalignError, match="prediction_type"):
        loss_weight(SNR, "snr", "flow")
