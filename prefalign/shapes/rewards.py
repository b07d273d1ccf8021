"""Reward-registry entries of the shapes world: `shapes-oracle` (ground truth) and `shapes-clip` (learned).

- shapes-oracle wraps `prefalign.shapes.oracle` (score in [0, 1]; option `part` = score | fidelity |
  aesthetic, so reward hacking can be read per part). It has no gradient path: it is a measurement made of
  thresholds and connected components, and a smooth surrogate would be a different, learnable reward.
  `differentiable` raises.
- shapes-clip is CLIPScore on the small shapes-clip model: `scale · max(cos, 0)` (default 100, as
  torchmetrics), differentiable with respect to the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from prefalign.errors import PrefalignError
from prefalign.rewards.base import ImageLike, RewardInfo, RewardModel
from prefalign.rewards.clip_common import ClipLikeReward, as_bool, as_float, cosine_to_score
from prefalign.rewards.images import load_rgb
from prefalign.shapes.clip import ShapesCLIP, ShapesCLIPConfig, load_shapes_clip
from prefalign.shapes.oracle import SIZE, oracle_breakdown

ORACLE_PARTS = ("score", "fidelity", "aesthetic")


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ShapesOracleReward(RewardModel):
    """The ground-truth oracle as a RewardModel (no parameters; runs on CPU whatever `device` says)."""

    def __init__(self, part: str = "score") -> None:
        super().__init__()
        if part not in ORACLE_PARTS:
            raise PrefalignError(
                f"shapes-oracle option part='{part}' is unknown; use one of {', '.join(ORACLE_PARTS)}"
            )
        self.part = part
        self.info = RewardInfo(
            name="shapes-oracle" if part == "score" else f"shapes-oracle.{part}",
            version="shapes-oracle v1 (docs/shapes.md)",
            higher_is_better=True,
            input_size=SIZE,
            convention=f"{part} in [0, 1]" + (" = 0.7 fidelity + 0.3 aesthetic" if part == "score" else ""),
        )

    @torch.no_grad()
    def score(
        self, images: Sequence[ImageLike], prompts: Sequence[str], batch_size: int = 512
    ) -> torch.Tensor:
        """Oracle scores; a float [B, 3, H, W] tensor is scored as is, anything else via 8-bit RGB."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            batch = images.float()
        else:
            batch = _stack_one_size([_pil_to_tensor(load_rgb(img)) for img in images]) if len(images) else None
        if batch is None:
            return torch.zeros(0)
        return oracle_breakdown(batch, list(prompts), chunk=max(1, batch_size))[self.part]

    def differentiable(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise PrefalignError(
            "shapes-oracle is a ground-truth measurement with no gradient; use shapes-clip or a trained "
            "reward for gradient-based trainers and keep shapes-oracle for evaluation"
        )


class ShapesCLIPReward(ClipLikeReward):
    """CLIPScore on shapes-clip; inputs are resized (bilinear, antialiased) to 32×32 when they differ."""

    def __init__(self, model: ShapesCLIP, info: RewardInfo, scale: float, clip_at_zero: bool) -> None:
        super().__init__(info)
        self.model = model
        self.scale, self.clip_at_zero = scale, clip_at_zero
        self.context_length = model.config.context_length
        self.requires_grad_(False)

    def preprocess_pil(self, img: Image.Image) -> torch.Tensor:
        size = self.model.config.image_size
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return _pil_to_tensor(img)

    def preprocess_tensor(self, x: torch.Tensor) -> torch.Tensor:
        size = self.model.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def reward_from_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = self.model.encode_image(pixels.to(self.device, self.dtype))
        text = self._encode_unique(prompts, self.model.encode_text)
        return cosine_to_score((image * text).sum(-1), self.scale, self.clip_at_zero)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        return [len(p.split()) + 2 for p in prompts]


def _stack_one_size(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The oracle measures shapes in pixels at one resolution, so a batch must share its size."""
    sizes = sorted({f"{t.shape[-1]}x{t.shape[-2]}" for t in tensors})
    if len(sizes) > 1:
        raise PrefalignError(f"shapes-oracle got images of mixed sizes ({', '.join(sizes)}); it scores one size "
                             f"at a time: resize them all to {SIZE}x{SIZE}")
    return torch.stack(tensors)


def load_shapes_oracle(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    part: str = "score",
) -> ShapesOracleReward:
    """Registry factory of `shapes-oracle`; it has no weights, so `checkpoint` must be None."""
    if checkpoint is not None:
        raise PrefalignError("shapes-oracle has no checkpoint; drop --checkpoint for it")
    return ShapesOracleReward(part)


def load_shapes_clip_reward(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    scale: float | str = 100.0,
    clip_at_zero: bool | str = True,
    config: dict | None = None,
) -> ShapesCLIPReward:
    """Registry factory of `shapes-clip` (default checkpoint: the one in prefalign/assets/shapes_clip).

    `config` (a saved `ShapesCLIPConfig` as a dict) builds that architecture with random weights instead: for
    a saved scorer on this backbone, which then loads its own weights."""
    scale, clip_at_zero = as_float(scale), as_bool(clip_at_zero)
    if config is not None:
        model = ShapesCLIP(ShapesCLIPConfig(**{**config, "channels": tuple(config["channels"])})).eval()
    else:
        model = load_shapes_clip(checkpoint, device, dtype)
    info = RewardInfo(
        name="shapes-clip",
        version=f"shapes-clip ({Path(checkpoint).name if checkpoint else 'shipped checkpoint'})",
        higher_is_better=True,
        input_size=model.config.image_size,
        convention=f"{scale:g} x max(cos, 0)" if clip_at_zero else f"{scale:g} x cos",
    )
    return ShapesCLIPReward(model, info, scale, clip_at_zero).to(device=device, dtype=dtype).eval()
