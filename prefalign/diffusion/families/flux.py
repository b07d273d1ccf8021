"""FLUX.1: CLIP-L (pooled) + T5, FluxTransformer2DModel on 2×2-packed latents with RoPE ids, rectified flow.

Latents stay [B, 16, h, w] everywhere in prefalign; the family packs them to [B, h/2·w/2, 64] around each
network call (FluxPipeline._pack_latents / _unpack_latents), so samplers and trainers need no FLUX special case.
"""

from __future__ import annotations

import torch

from prefalign.diffusion.conditioning import Conditioning
from prefalign.diffusion.families.base import (
    ModelFamily,
    clip_hidden_states,
    register_family,
    t5_hidden_states,
)
from prefalign.diffusion.schedules import flux_mu

FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 context
FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (guidance-distilled checkpoints, FLUX.1-dev)
FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px with the 8× VAE


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] → [B, (h/2)(w/2), 4C]: 2×2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of side (height, width)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE positions (0, row, col) of each packed token (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@register_family
class Flux(ModelFamily):
    """FluxPipeline.encode_prompt: CLIP `pooler_output` as pooled projections, T5 states as the context,
    text ids all zero. The network gets t = σ (it scales by 1000 itself) and, for guidance-distilled
    checkpoints (`guidance_embeds`), the guidance scale as an input instead of a CFG batch."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    denoiser_component = "transformer"
    num_text_encoders = 2
    flow_spacing = "flux"

    def encode_prompts(self, model, prompts: list[str]) -> Conditioning:
        tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
        _, out = clip_hidden_states(tokenizer, encoder, prompts, tokenizer.model_max_length, penultimate=False)
        t5 = t5_hidden_states(model.tokenizers[1], model.text_encoders[1], prompts, FLUX_MAX_SEQUENCE_LENGTH)
        return Conditioning(t5, None, {"pooled_projections": out.pooler_output.to(t5.dtype)})

    def forward(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        h, w = x_t.shape[-2:]
        guidance = None
        if model.denoiser.config.guidance_embeds:
            default = torch.full((x_t.shape[0],), FLUX_DEFAULT_GUIDANCE, device=x_t.device)
            guidance = cond.added.get("guidance", default).float()
        out = model.denoiser(
            hidden_states=pack_latents(x_t), timestep=t / 1000, guidance=guidance,
            pooled_projections=cond.added["pooled_projections"], encoder_hidden_states=cond.hidden_states,
            txt_ids=torch.zeros(cond.hidden_states.shape[1], 3, device=x_t.device, dtype=cond.hidden_states.dtype),
            img_ids=latent_image_ids(h, w, x_t.device, cond.hidden_states.dtype), return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def embeds_guidance(self, model) -> bool:
        return bool(model.denoiser.config.guidance_embeds)

    def guided(self, model, x_t, t, cond, uncond, guidance_scale: float) -> torch.Tensor:
        """Guidance-distilled checkpoints take the scale as the guidance input in one conditional forward (no
        CFG batch, as FluxPipeline); others get true CFG with `uncond` (FluxPipeline's true_cfg_scale)."""
        if not self.embeds_guidance(model):
            return super().guided(model, x_t, t, cond, uncond, guidance_scale)
        scale = torch.full((len(cond),), float(guidance_scale), device=x_t.device)
        return model(x_t, t, Conditioning(cond.hidden_states, cond.attention_mask, {**cond.added, "guidance": scale}))

    def sample_size(self, denoiser: torch.nn.Module) -> int:
        return FLUX_DEFAULT_SAMPLE_SIZE

    def latent_channels(self, denoiser: torch.nn.Module) -> int:
        return int(denoiser.config.in_channels) // 4

    def flow_mu(self, model, height: int, width: int) -> float | None:
        """FluxPipeline always computes μ from the packed length (used only by dynamic schedules)."""
        schedule = model.schedule
        return flux_mu((height // 2) * (width // 2), schedule.base_image_seq_len, schedule.max_image_seq_len,
                       schedule.base_shift, schedule.max_shift)
