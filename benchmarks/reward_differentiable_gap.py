"""Differentiable vs no-grad reward path on decoded images of tiny pipelines: the numbers behind the tolerances of
tests/test_reward_matrix.py (benchmarks/RESULTS.md, "The reward x trainer x family matrix").

Each reward of the matrix is loaded by its registry name on the same tiny fixtures the test uses (built by the
test module's fixtures, so the two cannot drift apart); 16×16 images decoded from tiny SD and FLUX pipelines are
rounded to 8 bits and scored by `score` and by `differentiable`; the largest |Δ| per reward is printed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reward_differentiable_gap.py
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from prefalign.diffusion.families import flux
from prefalign.diffusion.models import DiffusionModel
from prefalign.diffusion.tiny import save_tiny_pipeline
from prefalign.rewards.registry import load

TEST = Path(__file__).resolve().parents[1] / "tests" / "test_reward_matrix.py"
PROMPTS = ["a red circle", "two blue squares left of a green triangle"]


class _TempDirs:
    """The part of pytest's tmp_path_factory the fixture uses."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="reward_gap_"))

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path


def main() -> None:
    spec = importlib.util.spec_from_file_location("test_reward_matrix", TEST)
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    dirs = _TempDirs()
    settings = matrix.reward_settings.__wrapped__(dirs)
    flux.FLUX_DEFAULT_SAMPLE_SIZE = 8  # a saved FLUX has no size: FluxPipeline's 128
    pipelines = {f: DiffusionModel.from_pretrained(save_tiny_pipeline(dirs.root / f, f, seed=3, sample_size=8))
                 for f in ("sd", "flux")}
    print("| reward | max abs(differentiable - score) | mean abs(score) | test tolerance |")
    print("|---|---|---|---|")
    for name in matrix.REWARDS:
        reward = load(name, settings["checkpoints"], "cpu", per_reward=settings["options"])
        worst, scale = 0.0, 0.0
        for model in pipelines.values():
            x0 = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
            images = (model.decode(x0).clamp(0, 1) * 255).round() / 255
            with torch.no_grad():
                plain = reward.score(images, PROMPTS).float()
                gradient_path = reward.differentiable(images, PROMPTS).float()
            worst = max(worst, float((gradient_path - plain).abs().max()))
            scale = max(scale, float(plain.abs().mean()))
        print(f"| {name} | {worst:.2g} | {scale:.3g} | {matrix.DIFFERENTIABLE_TOLERANCE[name]:g} |")


if __name__ == "__main__":
    main()
