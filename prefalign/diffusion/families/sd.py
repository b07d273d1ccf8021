"""Stable Diffusion 1.x / 2.x: CLIP text encoder, UNet2DConditionModel, KL VAE."""

from __future__ import annotations

from prefalign.diffusion.conditioning import Conditioning
from prefalign.diffusion.families.base import ModelFamily, clip_hidden_states, register_family


@register_family
class StableDiffusion(ModelFamily):
    """StableDiffusionPipeline.encode_prompt: the CLIP last hidden state, padded to the tokenizer's max."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"

    def encode_prompts(self, model, prompts: list[str]) -> Conditioning:
        tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
        hidden, _ = clip_hidden_states(tokenizer, encoder, prompts, tokenizer.model_max_length, penultimate=False)
        return Conditioning(hidden)

    def index_extras(self, model) -> dict:
        return {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
