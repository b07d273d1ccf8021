"""Shapes-world image sources with one signature, `(prompts, seeds) -> images [B, 3, H, W] in [0, 1]`.

The teacher (and later aligned models) next to two references: ideal renders (the oracle's ceiling) and web
data (what the teacher was pretrained on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prefalign.diffusion.generate import ImageSource, sample_images
from prefalign.diffusion.models import DiffusionModel
from prefalign.shapes.grammar import parse_prompt
from prefalign.shapes.render import render
from prefalign.shapes.teacher import load_teacher
from prefalign.shapes.webdata import sample_web_example

__all__ = ["ImageSource", "ideal_renders", "model_source", "teacher_source", "web_data_images"]


def ideal_renders(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Defect-free renders of each prompt, layout jittered by its seed."""
    pairs = zip(prompts, seeds, strict=True)
    return torch.stack([render(parse_prompt(p), rng=np.random.default_rng(s)) for p, s in pairs])


def web_data_images(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Images drawn from the pretraining (web-data) distribution for each prompt."""
    pairs = zip(prompts, seeds, strict=True)
    return torch.stack([sample_web_example(np.random.default_rng(s), scene=parse_prompt(p)).image for p, s in pairs])


def teacher_source(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    steps: int = 25,
    guidance: float = 3.0,
    eta: float = 0.0,
    batch_size: int = 64,
) -> ImageSource:
    """DDIM + CFG samples of a teacher pipeline directory (default: the shipped checkpoint)."""
    return model_source(load_teacher(path, device), steps, guidance, eta, batch_size)


def model_source(model: DiffusionModel, steps: int = 25, guidance: float = 3.0, eta: float = 0.0,
                 batch_size: int = 64) -> ImageSource:
    """DDIM + CFG samples of a loaded model, `batch_size` images per sampler call; carries `nfe` (network
    evaluations per image: CFG doubles each step) for the leaderboard."""

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        chunks = [
            sample_images(model, prompts[i : i + batch_size], seeds[i : i + batch_size], steps, guidance, eta).cpu()
            for i in range(0, len(prompts), batch_size)
        ]
        return torch.cat(chunks)

    generate.nfe = steps * (1 if guidance == 1 else 2)  # type: ignore[attr-defined]
    return generate
