"""Stable Diffusion XL: two CLIP encoders, pooled text embeddings and size micro-conditions."""

from __future__ import annotations

import torch

from prefalign.diffusion.conditioning import Conditioning
from prefalign.diffusion.families.base import ModelFamily, clip_hidden_states, register_family
from prefalign.errors import PrefalignError


@register_family
class StableDiffusionXL(ModelFamily):
    """StableDiffusionXLPipeline.encode_prompt + _get_add_time_ids: penultimate hidden states of both encoders
    concatenated, pooled `text_embeds` of text_encoder_2, time_ids = (H, W, 0, 0, H, W) at the default image
    size; "" gives zeros when force_zeros_for_empty_prompt (the pipeline's negative)."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    num_text_encoders = 2

    def encode_prompts(self, model, prompts: list[str]) -> Conditioning:
        embeds, pooled = [], None
        for tokenizer, encoder in zip(model.tokenizers, model.text_encoders, strict=True):
            hidden, out = clip_hidden_states(tokenizer, encoder, prompts, tokenizer.model_max_length, True)
            embeds.append(hidden)
            pooled = getattr(out, "text_embeds", pooled)
        if pooled is None:
            raise PrefalignError("SDXL text_encoder_2 must be a CLIPTextModelWithProjection (text_embeds)")
        hidden = torch.cat(embeds, dim=-1)
        if model.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)[:, None, None]
            hidden = hidden.masked_fill(empty, 0.0)
            pooled = pooled.masked_fill(empty[:, :, 0], 0.0)
        h, w = model.image_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden.dtype, device=hidden.device)
        return Conditioning(hidden, None, {"text_embeds": pooled, "time_ids": time_ids.expand(len(hidden), -1)})

    def index_extras(self, model) -> dict:
        return {"force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt}
