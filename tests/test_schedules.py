"""Noise schedules and parameterisation conversions, against diffusers and closed forms."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from prefalign.diffusion.schedules import (
    NoiseSchedule,
    alphas_cumprod_from_log_snr,
    log_snr_from_alphas_cumprod,
    predicted_x0_eps,
    training_target,
)
from prefalign.errors import PrefalignError


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("linear", {"beta_start": 1e-4, "beta_end": 0.02}),
        ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("squaredcos_cap_v2", {}),
    ],
)
def test_alphas_cumprod_match_diffusers(name, kwargs):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kwargs).alphas_cumprod.double()
    ours = NoiseSchedule.make(name, 1000, **kwargs).alphas_cumprod
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_from_diffusers_config_reads_sd_scheduler():
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    schedule = NoiseSchedule.from_diffusers_config(config)
    assert schedule.num_timesteps == 1000
    assert math.isclose(float(schedule.alphas_cumprod[-1]), 0.0047, rel_tol=0.01)  # SD's known terminal ᾱ


def test_snr_log_snr_round_trip():
    schedule = NoiseSchedule.make("scaled_linear")
    lam = schedule.log_snr
    torch.testing.assert_close(alphas_cumprod_from_log_snr(lam), schedule.alphas_cumprod)
    t = torch.arange(1000)
    torch.testing.assert_close(schedule.snr(t).log(), log_snr_from_alphas_cumprod(schedule.alphas_cumprod))
    assert torch.all(lam[1:] < lam[:-1]), "logSNR must decrease with t"


def test_timesteps_from_log_snr_inverts_the_table():
    schedule = NoiseSchedule.make("linear")
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(schedule.timesteps_from_log_snr(schedule.log_snr[t]), t)
    cont = schedule.timesteps_from_log_snr(schedule.log_snr[t], discrete=False)
    torch.testing.assert_close(cont, t.double())
    # Halfway in λ between two neighbours interpolates to the half timestep; out-of-range clamps.
    mid = (schedule.log_snr[10] + schedule.log_snr[11]) / 2
    assert math.isclose(float(schedule.timesteps_from_log_snr(mid[None], discrete=False)), 10.5, abs_tol=1e-9)
    extremes = schedule.timesteps_from_log_snr(torch.tensor([1e3, -1e3]))
    assert extremes.tolist() == [0, 999]


def test_add_noise_matches_diffusers():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule.make("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), sched.add_noise(x0, noise, t), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_conversions_recover_x0_and_eps(prediction_type):
    schedule = NoiseSchedule.make("scaled_linear")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 100, 400, 700, 990])
    alpha, sigma = schedule.alpha_sigma(t, like=x0)
    x_t = alpha * x0 + sigma * eps
    target = training_target(x0, eps, alpha, sigma, prediction_type)
    x0_hat, eps_hat = predicted_x0_eps(target, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_v_target_matches_diffusers_velocity():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule.make("scaled_linear")
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([5, 300, 900])
    alpha, sigma = schedule.alpha_sigma(t, like=x0)
    torch.testing.assert_close(
        training_target(x0, noise, alpha, sigma, "v_prediction"), sched.get_velocity(x0, noise, t), atol=1e-6, rtol=1e-5
    )


def test_unknown_names_are_one_line_errors():
    with pytest.raises(PrefalignError, match="known: linear"):
        NoiseSchedule.make("quadratic")
    with pytest.raises(PrefalignError, match="prediction_type"):
        predicted_x0_eps(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1), "flow")
