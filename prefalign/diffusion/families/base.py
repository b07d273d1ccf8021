"""A model family is a strategy: how to encode prompts, call the network and size its latents.

`DiffusionModel` (prefalign.diffusion.models) owns the components, the schedule and classifier-free guidance; a family only says what
differs between SD, SDXL, PixArt, pixel-space, SD3 and FLUX. Adding a family is one file that subclasses
`ModelFamily` and decorates it with `register_family`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch

from prefalign.diffusion.conditioning import Conditioning
from prefalign.errors import PrefalignError


class FamilyModel(Protocol):
    """What a family reads of the `DiffusionModel` it serves: typed by shape, so the families, which the model
    imports, need not import it back."""

    denoiser: torch.nn.Module
    text_encoders: Any
    tokenizers: list
    schedule: Any
    vae_scale_factor: int
    image_size: int | None
    pipeline_class: str
    force_zeros_for_empty_prompt: bool

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

FAMILY_REGISTRY: dict[str, ModelFamily] = {}


class ModelFamily:
    """Defaults fit a CLIP-conditioned UNet in latent space (Stable Diffusion 1.x / 2.x)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"
    denoiser_component: ClassVar[str] = "unet"  # subfolder of the pipeline directory
    num_text_encoders: ClassVar[int] = 1
    uses_vae: ClassVar[bool] = True
    flow_spacing: ClassVar[str] = "linspace"  # the pipeline's flow sigma grid (`FlowSchedule.sampling_sigmas`)

    def encode_prompts(self, model: FamilyModel, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def forward(self, model: FamilyModel, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The raw network output for x_t [B, C, H, W], timesteps t [B] and conditioning on x_t's device/dtype."""
        return model.denoiser(
            x_t, t, encoder_hidden_states=cond.hidden_states, added_cond_kwargs=cond.added or None,
            return_dict=False,
        )[0]

    def guided(
        self, model: FamilyModel, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022) with one batched forward of [uncond; cond], as the
        diffusers pipelines run it: uncond + w·(cond − uncond)."""
        if len(uncond) == 1 and len(cond) > 1:
            uncond = uncond.repeat_interleave(len(cond))
        out_uncond, out_cond = model(torch.cat([x_t, x_t]), torch.cat([t, t]), uncond.cat(cond)).chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    def embeds_guidance(self, model: FamilyModel) -> bool:
        """True when the guidance scale is a network input (guidance-distilled FLUX) rather than a CFG batch."""
        return False

    def sample_size(self, denoiser: torch.nn.Module) -> int:
        """The default latent side (the pipelines' `default_sample_size`)."""
        size = denoiser.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    def latent_channels(self, denoiser: torch.nn.Module) -> int:
        return int(denoiser.config.in_channels)

    def flow_mu(self, model: FamilyModel, height: int, width: int) -> float | None:
        """μ of a resolution-dependent flow shift for latents of side (height, width), or None (static)."""
        return None

    def index_extras(self, model: FamilyModel) -> dict:
        """Keys the diffusers pipeline class expects in model_index.json beyond the components."""
        return {}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family available by its `name`."""
    FAMILY_REGISTRY[cls.name] = cls()
    return cls


def get_family(name: str) -> ModelFamily:
    if name not in FAMILY_REGISTRY:
        raise PrefalignError(f"unknown model family '{name}'; use one of {', '.join(FAMILY_REGISTRY)}")
    return FAMILY_REGISTRY[name]


def clip_hidden_states(tokenizer, encoder: torch.nn.Module, prompts: Sequence[str], max_length: int,
                       penultimate: bool):
    """(CLIP text states padded to `max_length`, last or penultimate layer; the encoder's whole output, whose
    `text_embeds` / `pooler_output` the families pick from)."""
    device = next(encoder.parameters()).device
    tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    ids = tokens.input_ids.to(device)
    if penultimate:
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out
    use_mask = getattr(encoder.config, "use_attention_mask", False)
    out = encoder(ids, attention_mask=tokens.attention_mask.to(device) if use_mask else None)
    return out[0], out


def t5_hidden_states(tokenizer, encoder: torch.nn.Module, prompts: Sequence[str], max_length: int) -> torch.Tensor:
    """T5 last hidden states padded to `max_length`, without an attention mask (as SD3 and FLUX encode)."""
    device = next(encoder.parameters()).device
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )
    return encoder(tokens.input_ids.to(device), output_hidden_states=False)[0]
