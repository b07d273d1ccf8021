"""The denoising loss against a hand computation."""

import torch

from prefalign.diffusion.losses import denoising_loss, per_sample_mse
from prefalign.diffusion.schedules import NoiseSchedule


def test_denoising_loss_closed_form():
    schedule = NoiseSchedule.make("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 990])
    plain = denoising_loss(out, x0, noise, t, schedule)
    torch.testing.assert_close(plain, ((out - noise) ** 2).mean(dim=(1, 2, 3)))
    weighted = denoising_loss(out, x0, noise, t, schedule, weighting="min_snr", snr_gamma=5.0)
    snr = schedule.snr(t)
    torch.testing.assert_close(weighted, plain * torch.clamp(5.0 / snr, max=1.0).float())
    # x0-prediction regresses onto x0 itself.
    torch.testing.assert_close(denoising_loss(x0, x0, noise, t, schedule, "sample"), torch.zeros(3))
    assert per_sample_mse(torch.ones(2, 5), torch.zeros(2, 5)).tolist() == [1.0, 1.0]
