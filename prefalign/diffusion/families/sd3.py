"""Stable Diffusion 3 / 3.5: CLIP-L + CLIP-G + T5, SD3Transformer2DModel (MMDiT), rectified flow."""

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

SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 context


@register_family
class StableDiffusion3(ModelFamily):
    """StableDiffusion3Pipeline.encode_prompt: penultimate states of both CLIPs (tokenised to the first
    tokenizer's max) concatenated on channels, zero-padded to T5's width and joined with the T5 states on the
    sequence axis; pooled projections = both CLIPs' `text_embeds`, concatenated. The network gets t = σ·1000."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    denoiser_component = "transformer"
    num_text_encoders = 3

    def encode_prompts(self, model, prompts: list[str]) -> Conditioning:
        max_length = model.tokenizers[0].model_max_length
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(model.tokenizers[:2], model.text_encoders[:2], strict=True):
            hidden, out = clip_hidden_states(tokenizer, encoder, prompts, max_length, penultimate=True)
            clip_states.append(hidden)
            pooled.append(out[0])
        t5 = t5_hidden_states(model.tokenizers[2], model.text_encoders[2], prompts, SD3_MAX_SEQUENCE_LENGTH)
        clip = torch.cat(clip_states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        return Conditioning(hidden, None, {"pooled_projections": torch.cat(pooled, dim=-1)})

    def forward(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return model.denoiser(
            hidden_states=x_t, timestep=t, encoder_hidden_states=cond.hidden_states,
            pooled_projections=cond.added["pooled_projections"], return_dict=False,
        )[0]

    def flow_mu(self, model, height: int, width: int) -> float | None:
        """Only resolution-shifted schedules: μ of the patch-sequence length (SD3Pipeline's `calculate_shift`)."""
        schedule = model.schedule
        if not schedule.dynamic:
            return None
        patch = model.denoiser.config.patch_size
        return flux_mu((height // patch) * (width // patch), schedule.base_image_seq_len, schedule.max_image_seq_len,
                       schedule.base_shift, schedule.max_shift)
