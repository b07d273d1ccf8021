"""Text-to-image sampling with any `DiffusionModel`: CFG + DDIM (VP) or Euler (rectified flow), deterministic
per (seed, prompt index)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prefalign.diffusion.flow_sampling import flow_sample
from prefalign.diffusion.sampling import Denoiser, ddim_sample
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
