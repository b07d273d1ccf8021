"""Pixel-space models (the shapes-world teacher): a CLIP-style text encoder and a UNet on x_0 = 2·image − 1.

There is no diffusers pipeline class; `DiffusionModel.from_pretrained` loads the directory. The schedule may be
VP or rectified flow (a FlowMatchEulerDiscreteScheduler config): the family does not care.
"""

from __future__ import annotations

from prefalign.diffusion.families.base import register_family
from prefalign.diffusion.families.sd import StableDiffusion


@register_family
class PixelSpace(StableDiffusion):
    name = "pixel"
    pipeline_class = "PrefalignPixelPipeline"
    uses_vae = False

    def index_extras(self, model) -> dict:
        return {}
