"""DDIM/DDPM steps against diffusers' DDIMScheduler.step and the closed-form Normal density."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from prefalign.diffusion.sampling import (
    cfg_combine,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    gaussian_log_prob,
)
from prefalign.diffusion.schedules import NoiseSchedule
from prefalign.errors import PrefalignError

SD_KW = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _diffusers_ddim(prediction_type="epsilon", set_alpha_to_one=False, steps=20, spacing="leading", offset=1):
    sched = DDIMScheduler(
        **SD_KW, clip_sample=False, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=spacing, steps_offset=offset,
    )
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize(("spacing", "offset"), [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_timesteps_match_diffusers(spacing, offset):
    sched = _diffusers_ddim(steps=20, spacing=spacing, offset=offset)
    assert ddim_timesteps(20, 1000, spacing, offset) == sched.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(prediction_type, eta):
    sched = _diffusers_ddim(prediction_type)
    schedule = NoiseSchedule.make("scaled_linear")
    final = float(sched.final_alpha_cumprod)
    g = torch.Generator().manual_seed(0)
    for t in (951, 501, 1):  # includes the last step, whose ᾱ_prev is final_alpha_cumprod
        x_t, out, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        ref = sched.step(out, t, x_t, eta=eta, variance_noise=noise)
        ours = ddim_step(out, t, t - 50, x_t, schedule, prediction_type, eta, noise=noise, final_alpha_cumprod=final)
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.pred_x0, ref.pred_original_sample, atol=1e-5, rtol=1e-5)
        if eta == 0:
            assert ours.log_prob is None and torch.equal(ours.prev_sample, ours.mean)


def test_ddim_clip_sample_matches_diffusers():
    sched = DDIMScheduler(**SD_KW, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(10)
    schedule = NoiseSchedule.make("scaled_linear")
    x_t, out, noise = (3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(s)) for s in range(3))
    ref = sched.step(out, 501, x_t, eta=1.0, variance_noise=noise, use_clipped_model_output=True)
    ours = ddim_step(out, 501, 401, x_t, schedule, eta=1.0, noise=noise, clip_sample=1.0)
    torch.testing.assert_close(ours.prev_sample, ref.prev_sample, atol=1e-5, rtol=1e-5)


def test_eta_one_is_the_ddpm_posterior():
    """With η = 1 on the full grid, the DDIM step is DDPM's ancestral step (Ho et al. 2020, Eq. 6–7)."""
    ddpm = DDPMScheduler(**SD_KW, clip_sample=False, variance_type="fixed_small")
    ddpm.set_timesteps(1000)
    schedule = NoiseSchedule.make("scaled_linear")
    g = torch.Generator().manual_seed(4)
    x_t, out = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for t in (999, 400, 3):
        ref = ddpm.step(out, t, x_t, generator=torch.Generator().manual_seed(9))
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(9), dtype=x_t.dtype)
        ours = ddim_step(out, t, t - 1, x_t, schedule, eta=1.0, noise=z)
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample, atol=1e-5, rtol=1e-5)  # diffusers keeps ᾱ in fp32


def test_log_prob_is_the_closed_form_normal_density():
    schedule = NoiseSchedule.make("scaled_linear")
    g = torch.Generator().manual_seed(1)
    x_t, out = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    step = ddim_step(out, 601, 551, x_t, schedule, eta=1.0, generator=g)
    expected = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean)).log_prob(step.prev_sample)
    torch.testing.assert_close(step.log_prob, expected.flatten(1).sum(1))
    # Re-scoring a given x_{t−1} under the same model returns the same density (what trainers rely on).
    again = ddim_step(out, 601, 551, x_t, schedule, eta=1.0, prev_sample=step.prev_sample)
    torch.testing.assert_close(again.log_prob, step.log_prob)
    d = x_t[0].numel()
    mean_std = float(step.std.flatten()[0])
    at_mean = gaussian_log_prob(step.mean, step.mean, step.std)
    torch.testing.assert_close(at_mean, torch.full((3,), -d * (math.log(mean_std) + 0.5 * math.log(2 * math.pi)), dtype=torch.float64))


def test_cfg_combine_and_sampler_end_to_end():
    cond, uncond = torch.full((1, 2), 3.0), torch.full((1, 2), 1.0)
    torch.testing.assert_close(cfg_combine(cond, uncond, 7.5), torch.full((1, 2), 16.0))
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)

    schedule = NoiseSchedule.make("scaled_linear")
    sched = _diffusers_ddim(steps=10, set_alpha_to_one=True)
    target = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))

    def denoise(x, t):  # an oracle ε-predictor for a point-mass data distribution at `target`
        alpha, sigma = schedule.alpha_sigma(t, like=x)
        return (x - alpha * target) / sigma

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    ours, trajectory = ddim_sample(denoise, x_T, schedule, 10, steps_offset=1, return_trajectory=True)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(denoise(x, t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, target, atol=1e-4, rtol=1e-4)
    assert [t for t, _ in trajectory] == sched.timesteps.tolist()


def test_bad_step_count_is_a_one_line_error():
    with pytest.raises(PrefalignError, match="num_steps"):
        ddim_timesteps(0)
