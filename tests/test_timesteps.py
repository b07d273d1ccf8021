"""Timestep samplers: the sampled logSNR follows the closed-form density (KS tests, fixed seeds)."""

import math

import pytest
import torch
from scipy import stats

from prefalign.diffusion.schedules import NoiseSchedule
from prefalign.diffusion.timesteps import TimestepSampler, cauchy_log_snr, laplace_log_snr
from prefalign.errors import PrefalignError


def test_laplace_inverse_cdf_matches_formula_and_scipy():
    u = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    lam = laplace_log_snr(u, mu=0.3, b=0.5)
    expected = [0.3 - 0.5 * math.copysign(1, 0.5 - x) * math.log(1 - 2 * abs(x - 0.5)) for x in u.tolist()]
    torch.testing.assert_close(lam, torch.tensor(expected, dtype=torch.float64))
    # The same values are Laplace quantiles, mirrored: λ(u) = ppf(1 − u).
    torch.testing.assert_close(lam, torch.tensor(stats.laplace(0.3, 0.5).ppf(1 - u.numpy())))


def test_cauchy_inverse_cdf_is_the_cauchy_quantile():
    u = torch.tensor([0.05, 0.3, 0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(cauchy_log_snr(u, 1.0, 2.0), torch.tensor(stats.cauchy(1.0, 2.0).ppf(u.numpy())))


@pytest.mark.parametrize(("kind", "dist"), [("laplace", stats.laplace(0.0, 0.5)), ("cauchy", stats.cauchy(0.0, 1.0))])
def test_sampled_log_snr_passes_ks_test(kind, dist):
    sampler = TimestepSampler(kind)
    lam = sampler.sample_log_snr(20000, torch.Generator().manual_seed(0)).numpy()
    assert stats.kstest(lam, dist.cdf).pvalue > 0.01


def test_log_snr_density_integrates_to_one():
    for kind in ("laplace", "cauchy"):
        sampler = TimestepSampler(kind, loc=0.5, scale=0.75)
        grid = torch.linspace(-400, 400, 800001, dtype=torch.float64)
        mass = torch.trapezoid(sampler.log_snr_density(grid), grid)
        assert abs(float(mass) - 1) < 2e-3


def test_laplace_timesteps_follow_the_density_on_a_continuous_schedule():
    """Mapped onto the schedule's continuous axis, λ_t of the sampled t still follows Laplace(μ, b) inside its range."""
    schedule = NoiseSchedule.make("linear")
    sampler = TimestepSampler("laplace", loc=-1.0, scale=1.0)
    t = sampler(20000, schedule, torch.Generator().manual_seed(3), discrete=False)
    lam_table = schedule.log_snr
    lo, hi = t.floor().long(), t.ceil().long()
    lam = lam_table[lo] + (t - lo) * (lam_table[hi] - lam_table[lo])
    inside = (lam > lam_table[-1] + 1e-9) & (lam < lam_table[0] - 1e-9)
    dist = stats.laplace(-1.0, 1.0)
    a, b = dist.cdf(float(lam_table[-1])), dist.cdf(float(lam_table[0]))
    truncated_cdf = lambda x: (dist.cdf(x) - a) / (b - a)  # noqa: E731
    assert stats.kstest(lam[inside].numpy(), truncated_cdf).pvalue > 0.01


def test_discrete_laplace_concentrates_near_log_snr_zero():
    schedule = NoiseSchedule.make("scaled_linear")
    t = TimestepSampler("laplace")(50000, schedule, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    t_zero = int(schedule.timesteps_from_log_snr(torch.zeros(1)))
    near = (schedule.log_snr[t].abs() < 0.5).double().mean()
    assert float(near) > 0.55  # Laplace(0, 0.5) puts 1 − e^{-1} ≈ 63% of its mass in |λ| < 0.5
    assert abs(float(t.double().median()) - t_zero) < 15


def test_uniform_and_logit_normal_ranges():
    schedule = NoiseSchedule.make("scaled_linear")
    g = torch.Generator().manual_seed(0)
    uni = TimestepSampler("uniform")(100000, schedule, g)
    counts = torch.bincount(uni, minlength=1000).double()
    assert stats.chisquare(counts.numpy()).pvalue > 0.001
    ln = TimestepSampler("logit-normal")(20000, schedule, g, discrete=False)
    assert stats.kstest(torch.logit(ln / 999).numpy(), stats.norm(0, 1).cdf).pvalue > 0.01


def test_unknown_sampler_lists_known():
    with pytest.raises(PrefalignError, match="known: uniform"):
        TimestepSampler("beta")
