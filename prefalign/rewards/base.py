"""The one interface every reward implements.

A reward maps (image, prompt) pairs to one number each. Two paths:
- `score`: batched and no-grad; accepts PIL images, uint8 arrays, file paths or float tensors in [0, 1], and
  uses the official preprocessing (PIL resizing etc.) so scores reproduce the official implementation.
- `differentiable`: float tensors [B, 3, H, W] in [0, 1] only; torch-only preprocessing so gradients reach the
  pixels (reward-gradient trainers such as Diff-Instruct++ use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ImageLike = Any  # PIL.Image.Image | numpy uint8 array | str | pathlib.Path | torch.Tensor in [0, 1]


@dataclass(frozen=True)
class RewardInfo:
    """What a score means: enough to print a leaderboard column header honestly."""

    name: str
    version: str
    higher_is_better: bool
    input_size: int | None  # native square input resolution of the backbone, None when any size works
    convention: str  # e.g. "cosine x 100 (HPS benchmark tables)"


class RewardModel(torch.nn.Module):
    """Base class. Subclasses set `info` and implement `score` and `differentiable`."""

    info: RewardInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def higher_is_better(self) -> bool:
        return self.info.higher_is_better

    @property
    def input_size(self) -> int | None:
        return self.info.input_size

    @property
    def convention(self) -> str:
        return self.info.convention

    @torch.no_grad()
    def score(self, images: Sequence[ImageLike], prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        raise NotImplementedError

    def differentiable(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError
