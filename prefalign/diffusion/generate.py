"""Text-to-image sampling with any `DiffusionModel`: CFG + DDIM (VP) or Euler (rectified flow), deterministic
per (seed, prompt index)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from prefalign.diffusion.flow_sampling import flow_sample, flow_step
from prefalign.diffusion.sampling import Denoiser, StepOutput, ddim_sample, ddim_step, ddim_timesteps
from prefalign.diffusion.schedules import Schedule

# Every image source (models, references, trained generators) has this signature: (prompts, seeds) → images
# [B, 3, H, W] in [0, 1], deterministic per (prompt, seed).
ImageSource = Callable[[list[str], list[int]], torch.Tensor]


def initial_noise(
    shape: tuple[int, int, int], seeds: Sequence[int], device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """x_T for each seed: one CPU generator per image, so a sample does not depend on its batch-mates."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def sample_latents(
    denoise: Denoiser,
    x_T: torch.Tensor,
    schedule: Schedule,
    num_steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    **sampler_kwargs,
) -> torch.Tensor:
    """x_0 from x_T with the schedule's own sampler: DDIM(η) for VP, Euler (Flow-GRPO's SDE when η > 0, η being
    its noise level a) for rectified flow. `sampler_kwargs` come from `DiffusionModel.sampler_kwargs()`."""
    if schedule.kind == "flow":
        return flow_sample(denoise, x_T, schedule, num_steps, noise_level=eta, generator=generator, **sampler_kwargs)
    return ddim_sample(denoise, x_T, schedule, num_steps, eta=eta, generator=generator, **sampler_kwargs)


def timestep_pairs(schedule: Schedule, num_steps: int, **sampler_kwargs) -> list[tuple[float, float]]:
    """The (t, prev_t) of each step of `sample_latents` on this grid: DDIM's integer timesteps (prev_t < 0 is the
    final step) or the flow sigma grid times T (prev_t = 0 is the final step)."""
    if schedule.kind == "flow":
        times = schedule.sampling_sigmas(num_steps, sampler_kwargs.get("spacing", "linspace"), sampler_kwargs.get("mu"))
        times = (times.to(torch.float32) * schedule.num_timesteps).tolist()
        return list(itertools.pairwise(times))
    steps = ddim_timesteps(num_steps, schedule.num_timesteps, sampler_kwargs.get("spacing", "leading"),
                           sampler_kwargs.get("steps_offset", 0))
    stride = schedule.num_timesteps // num_steps
    return [(t, t - stride) for t in steps]


def transition(
    schedule: Schedule,
    model_output: torch.Tensor,
    t: torch.Tensor | float,
    prev_t: torch.Tensor | float,
    x_t: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **sampler_kwargs,
) -> StepOutput:
    """One step of `sample_latents`' sampler: DDIM(η) for VP, the flow SDE with noise level η for flow. With
    `prev_sample` it scores a stored transition (its Gaussian log-probability under this output) instead of
    drawing one: what on-policy trainers (GRPO, SPO) need for both families."""
    if schedule.kind == "flow":
        return flow_step(model_output, t, prev_t, x_t, schedule, sampler_kwargs.get("prediction_type", "flow_prediction"),
                         eta, prev_sample=prev_sample, generator=generator)
    return ddim_step(model_output, t, prev_t, x_t, schedule, sampler_kwargs.get("prediction_type", "epsilon"), eta,
                     prev_sample=prev_sample, generator=generator,
                     final_alpha_cumprod=sampler_kwargs.get("final_alpha_cumprod", 1.0),
                     clip_sample=sampler_kwargs.get("clip_sample"))


@torch.no_grad()
def sample_images(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int = 25,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Sample one image per (prompt, seed) with classifier-free guidance; returns [B, 3, H, W] in [0, 1].

    `model` is a `prefalign.diffusion.models.DiffusionModel`; the unconditional branch uses `negative_prompt`
    ("" as in Stable Diffusion). The sampler and its grid (DDIM spacing, final ᾱ, x̂_0 clipping; flow shift)
    follow the model's scheduler config.
    """
    device, dtype = model.device, model.dtype
    cond = model.encode_prompts(list(prompts))
    uncond = model.encode_prompts([negative_prompt] * len(prompts))
    x_T = initial_noise(model.sample_shape, seeds, device, dtype)
    noise_gen = torch.Generator(device=device).manual_seed(int(seeds[0]) if len(seeds) else 0)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.guided(x, t, cond, uncond, guidance_scale)

    x0 = sample_latents(denoise, x_T, model.schedule, num_steps, eta, noise_gen, **model.sampler_kwargs())
    return model.decode(x0)
