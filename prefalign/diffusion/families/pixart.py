"""PixArt-α / Σ: T5 text encoder with an attention mask, PixArtTransformer2DModel (learned sigma)."""

from __future__ import annotations

import torch

from prefalign.diffusion.conditioning import Conditioning
from prefalign.diffusion.families.base import ModelFamily, register_family

# PixArt pipelines' default `max_sequence_length` (the T5 context the models were trained with).
PIXART_MAX_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


@register_family
class PixArt(ModelFamily):
    """PixArtAlphaPipeline.encode_prompt: T5 last hidden state and its attention mask, padded to the
    pipeline's max_sequence_length (120; 300 for PixArt-Σ), not the tokenizer's model_max_length."""

    name = "pixart"
    pipeline_class = "PixArtAlphaPipeline"
    denoiser_class = "PixArtTransformer2DModel"
    denoiser_component = "transformer"

    def encode_prompts(self, model, prompts: list[str]) -> Conditioning:
        encoder = model.text_encoders[0]
        device = next(encoder.parameters()).device
        max_length = PIXART_MAX_LENGTH.get(model.pipeline_class, 120)
        tokens = model.tokenizers[0](
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(device)
        return Conditioning(encoder(tokens.input_ids.to(device), attention_mask=mask)[0], mask)

    def forward(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = {"resolution": None, "aspect_ratio": None}
        if model.denoiser.use_additional_conditions:
            # PixArt-α 1024px micro-conditions: image (H, W) and H/W, as PixArtAlphaPipeline passes them.
            h, w = x_t.shape[-2] * model.vae_scale_factor, x_t.shape[-1] * model.vae_scale_factor
            added = {
                "resolution": x_t.new_tensor([[h, w]]).expand(x_t.shape[0], 2),
                "aspect_ratio": x_t.new_tensor([[h / w]]).expand(x_t.shape[0], 1),
            }
        out = model.denoiser(
            x_t, encoder_hidden_states=cond.hidden_states, encoder_attention_mask=cond.attention_mask,
            timestep=t, added_cond_kwargs=added, return_dict=False,
        )[0]
        return out[:, : x_t.shape[1]]  # learned-sigma models output [ε; variance]: keep ε
