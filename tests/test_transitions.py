"""`timestep_pairs` + `transition` replay `sample_latents` step by step for both families, and re-score a stored
transition with the log-probability the sampler drew it with (what GRPO and SPO rely on)."""

import pytest
import torch

from prefalign.diffusion.generate import sample_latents, timestep_pairs, transition
from prefalign.diffusion.schedules import FlowSchedule, NoiseSchedule, cosine_betas


def _denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).float() / 1000


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_transitions_replay_the_sampler_and_rescore_their_draws(kind):
    schedule = FlowSchedule(shift=3.0) if kind == "flow" else NoiseSchedule(cosine_betas(1000))
    kwargs = {"prediction_type": "flow_prediction"} if kind == "flow" else {"prediction_type": "v_prediction",
                                                                             "spacing": "trailing"}
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = sample_latents(_denoise, x_T, schedule, 6, 0.7, torch.Generator().manual_seed(1), **kwargs)
    x, generator = x_T, torch.Generator().manual_seed(1)
    pairs = timestep_pairs(schedule, 6, **kwargs)
    assert len(pairs) == 6 and all(prev < t for t, prev in pairs)
    for t, prev_t in pairs:
        t_batch = torch.full((3,), t)
        step = transition(schedule, _denoise(x, t_batch), t, prev_t, x, 0.7, generator=generator, **kwargs)
        again = transition(schedule, _denoise(x, t_batch), t, prev_t, x, 0.7, prev_sample=step.prev_sample, **kwargs)
        if step.log_prob is not None:
            torch.testing.assert_close(again.log_prob, step.log_prob)
        x = step.prev_sample
    torch.testing.assert_close(x, expected)
