"""Rectified-flow schedule, conversions, timestep samplers, loss weights and steps against diffusers and closed
forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from scipy import stats

from prefalign.diffusion.conversions import convert, predicted_x0_eps, score_from_eps, training_target
from prefalign.diffusion.flow_sampling import flow_sample, flow_step
from prefalign.diffusion.sampling import gaussian_log_prob
from prefalign.diffusion.schedules import FlowSchedule, NoiseSchedule, flux_mu, schedule_from_config
from prefalign.diffusion.timesteps import TimestepSampler
from prefalign.diffusion.weighting import loss_weight
from prefalign.errors import PrefalignError

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV = {**SD3, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}


def test_sd3_config_loads_as_flow_not_ddpm():
    schedule, prediction = schedule_from_config(SD3)
    assert prediction == "flow_prediction" and schedule == FlowSchedule(shift=3.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(schedule.sigmas, reference.sigmas.flip(0).double(), atol=1e-6, rtol=0)
    assert math.isclose(float(schedule.sigmas[0]), 0.0029940, abs_tol=1e-6)  # SD3's shifted sigma_min
    with pytest.raises(PrefalignError, match="use_karras_sigmas"):
        schedule_from_config({**SD3, "use_karras_sigmas": True})
    sana, prediction = schedule_from_config({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True,
                                             "flow_shift": 3.0, "prediction_type": "flow_prediction"})
    assert prediction == "flow_prediction" and sana.shift == 3.0


@pytest.mark.parametrize("steps", [1, 10, 28])
def test_sampling_sigmas_match_set_timesteps(steps):
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3.set_timesteps(steps)
    ours = FlowSchedule(shift=3.0).sampling_sigmas(steps)
    torch.testing.assert_close(ours.float(), sd3.sigmas, atol=1e-6, rtol=0)
    flux = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV)
    mu = flux_mu(1024)
    flux.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).numpy(), mu=mu)
    ours = FlowSchedule.from_diffusers_config(FLUX_DEV).sampling_sigmas(steps, "flux", mu)
    torch.testing.assert_close(ours.float(), flux.sigmas, atol=1e-6, rtol=0)


def test_worked_shift_values():
    sigmas = FlowSchedule(shift=3.0).sampling_sigmas(10)
    assert [round(float(s), 4) for s in sigmas[[1, -2, -1]]] == [0.9601, 0.0089, 0.0]
    assert math.isclose(flux_mu(1024), 0.63, abs_tol=1e-9) and math.isclose(flux_mu(4096), 1.15, abs_tol=1e-12)
    with pytest.raises(PrefalignError, match="mu"):
        FlowSchedule.from_diffusers_config(FLUX_DEV).sampling_sigmas(4)


def test_flow_forward_process_snr_and_log_snr_inverse():
    schedule = FlowSchedule(shift=3.0)
    t = torch.tensor([3.0, 250.0, 500.0, 999.0])
    sigma = t.double() / 1000
    alpha, sig = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha, 1 - sigma)
    torch.testing.assert_close(sig, sigma)
    torch.testing.assert_close(schedule.snr(t), ((1 - sigma) / sigma) ** 2)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    reference = scheduler.scale_noise(x0, scheduler.timesteps, noise)
    torch.testing.assert_close(schedule.add_noise(x0, noise, scheduler.timesteps), reference)
    lam = 2 * torch.log((1 - sigma) / sigma)
    torch.testing.assert_close(schedule.timesteps_from_log_snr(lam, discrete=False), t.double())
    table_t = schedule.sigmas[[0, 10, 500, 998]] * 1000
    torch.testing.assert_close(schedule.timesteps_from_log_snr(schedule.log_snr[[0, 10, 500, 998]]), table_t)


def test_vp_float_timesteps_interpolate_log_snr():
    schedule = NoiseSchedule.make("scaled_linear")
    lam = schedule.log_snr
    alpha, sigma = schedule.alpha_sigma(torch.tensor([10.5, 10.0]))
    torch.testing.assert_close((alpha**2 / sigma**2).log(), torch.stack([(lam[10] + lam[11]) / 2, lam[10]]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "flow_prediction"])
def test_flow_conversions_round_trip_and_closed_forms(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64).reshape(-1, 1, 1)
    alpha = 1 - sigma
    x_t = alpha * x0 + sigma * eps
    output = training_target(x0, eps, alpha, sigma, prediction_type)
    x0_hat, eps_hat = predicted_x0_eps(output, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    velocity = convert(output, x_t, alpha, sigma, prediction_type, "flow_prediction")
    torch.testing.assert_close(velocity, eps - x0)
    torch.testing.assert_close(x_t - sigma * velocity, x0)  # x̂0 = x − σv
    torch.testing.assert_close(x_t + (1 - sigma) * velocity, eps)  # ε̂ = x + (1 − σ)v
    # DanceGRPO's score: −(x − (1 − σ)x̂0)/σ².
    torch.testing.assert_close(score_from_eps(eps_hat, sigma), -(x_t - (1 - sigma) * x0_hat) / sigma**2)


def test_vp_convert_eps_to_v_matches_diffusers():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule.make("scaled_linear")
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([5, 300, 900])
    alpha, sigma = schedule.alpha_sigma(t, like=x0)
    x_t = schedule.add_noise(x0, noise, t)
    v = convert(noise, x_t, alpha, sigma, "epsilon", "v_prediction")
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t), atol=1e-5, rtol=1e-5)


def test_flow_timestep_samplers_follow_closed_forms():
    g = torch.Generator().manual_seed(0)
    plain, shifted = FlowSchedule(), FlowSchedule(shift=3.0)
    uniform = TimestepSampler("uniform")(20000, plain, g, discrete=False) / 1000
    assert stats.kstest(uniform.numpy(), stats.uniform(0, 1).cdf).pvalue > 0.01
    table = TimestepSampler("uniform")(2000, shifted, g)
    assert torch.isin(table, shifted.sigmas * 1000).all()
    ln = TimestepSampler("logit-normal", loc=0.5)(20000, plain, g, discrete=False) / 1000
    assert stats.kstest(torch.logit(ln).numpy(), stats.norm(0.5, 1).cdf).pvalue > 0.01
    # Shifted logit-normal: σ = shift(u), i.e. logit σ = logit u + log s.
    ln3 = TimestepSampler("logit-normal")(20000, shifted, g, discrete=False) / 1000
    assert stats.kstest((torch.logit(ln3) - math.log(3)).numpy(), stats.norm(0, 1).cdf).pvalue > 0.01
    for kind, dist in (("laplace", stats.laplace(-1.0, 0.5)), ("cauchy", stats.cauchy(-1.0, 1.0))):
        sigma = TimestepSampler(kind, loc=-1.0)(20000, shifted, g, discrete=False) / 1000
        lam = 2 * torch.log((1 - sigma) / sigma)
        assert stats.kstest(lam.numpy(), dist.cdf).pvalue > 0.01


def test_min_snr_for_flow_is_min_snr_in_x0_space():
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.9, 1.0], dtype=torch.float64)
    snr = ((1 - sigma) / sigma) ** 2
    weight = loss_weight(snr, "min_snr", "flow_prediction", gamma=5.0)
    # ‖u − û‖² = ‖x0 − x̂0‖²/σ², so a v-space weight of min(SNR, γ)·σ² is an x0-space weight of min(SNR, γ).
    expected = torch.where(snr == 0, torch.ones_like(snr), snr.clamp(max=5.0) * sigma**2)
    torch.testing.assert_close(weight, expected)
    torch.testing.assert_close(loss_weight(snr, "snr", "flow_prediction")[:-1], (snr * sigma**2)[:-1])


def test_flow_step_at_zero_noise_is_the_diffusers_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    schedule = FlowSchedule(shift=3.0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 6, generator=g)
    for t, prev_t in zip(scheduler.timesteps, [*scheduler.timesteps[1:], torch.tensor(0.0)], strict=True):
        velocity = torch.randn(x.shape, generator=g)
        expected = scheduler.step(velocity, t, x).prev_sample
        out = flow_step(velocity, float(t), float(prev_t), x, schedule)
        assert out.log_prob is None and float(out.std.abs().max()) == 0
        torch.testing.assert_close(out.prev_sample, expected, atol=1e-6, rtol=1e-6)
        x = expected


def test_flow_sde_step_log_prob_is_the_closed_form_gaussian():
    schedule = FlowSchedule(shift=3.0)
    sigmas = schedule.sampling_sigmas(10)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    scales = []
    for i in range(3):
        sigma, sigma_next, a = float(sigmas[i]), float(sigmas[i + 1]), 0.7
        out = flow_step(v, sigma * 1000, sigma_next * 1000, x, schedule, noise_level=a, noise=noise)
        dt = sigma_next - sigma
        s = a * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))  # Flow-GRPO's std_dev_t
        scales.append(float(out.std.flatten()[0]) / math.sqrt(-dt))
        mean = x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        std = s * math.sqrt(-dt)
        torch.testing.assert_close(out.mean, mean)
        torch.testing.assert_close(out.prev_sample, mean + std * noise)
        closed = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).flatten(1).sum(1)
        torch.testing.assert_close(out.log_prob, closed)
        again = flow_step(v, sigma * 1000, sigma_next * 1000, x, schedule, noise_level=a, prev_sample=out.prev_sample)
        torch.testing.assert_close(again.log_prob, gaussian_log_prob(out.prev_sample, mean, torch.tensor(std)))
    assert [round(s, 2) for s in scales] == [3.51, 3.44, 2.27]  # Flow-GRPO's 10-step SD3 values


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_flow_samplers_keep_the_marginals_of_gaussian_data(noise_level):
    """Data x0 ~ N(0, c²): the exact velocity is linear in x, and both the ODE and the SDE must return N(0, c²)."""
    c = 0.5

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t.double() / 1000).reshape(-1, 1)
        var = (1 - sigma) ** 2 * c**2 + sigma**2
        return ((sigma - (1 - sigma) * c**2) / var * x.double()).to(x.dtype)

    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    x0 = flow_sample(velocity, x_T, FlowSchedule(shift=3.0), 200, noise_level=noise_level, generator=g)
    assert abs(float(x0.std()) - c) < 0.02 and abs(float(x0.mean())) < 0.02
