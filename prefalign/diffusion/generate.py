"""Text-to-image sampling with any `DiffusionModel`: CFG + DDIM, deterministic per (seed, prompt index)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefalign.diffusion.sampling import ddim_sample


def initial_noise(
    shape: tuple[int, int, int], seeds: Sequence[int], device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """x_T for each seed: one CPU generator per image, so a sample does not depend on its batch-mates."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


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
    """Sample one image per (prompt, seed) with classifier-free guidance and DDIM; returns [B, 3, H, W] in [0, 1].

    `model` is a `prefalign.diffusion.models.DiffusionModel`; the unconditional branch uses `negative_prompt`
    ("" as in Stable Diffusion). Timestep spacing, final ᾱ and x̂_0 clipping follow the model's scheduler config.
    """
    device, dtype = model.device, model.dtype
    cond = model.encode_prompts(list(prompts))
    uncond = model.encode_prompts([negative_prompt] * len(prompts))
    x_T = initial_noise(model.sample_shape, seeds, device, dtype)
    noise_gen = torch.Generator(device=device).manual_seed(int(seeds[0]) if len(seeds) else 0)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.guided(x, t, cond, uncond, guidance_scale)

    x0 = ddim_sample(denoise, x_T, model.schedule, num_steps, eta=eta, generator=noise_gen, **model.sampler_kwargs())
    return model.decode(x0)
