"""Model families as registered strategies, one module each (see `base.ModelFamily`)."""

from prefalign.diffusion.families import flux, pixart, pixel, sd, sd3, sdxl  # noqa: F401  (registers them)
from prefalign.diffusion.families.base import FAMILY_REGISTRY, ModelFamily, get_family, register_family

__all__ = ["FAMILY_REGISTRY", "ModelFamily", "get_family", "register_family"]
