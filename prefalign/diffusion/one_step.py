"""One-step text-to-image generators distilled from a diffusion model (Diff-Instruct / Diff-Instruct++).

The generator is the reference network evaluated once at a fixed initial timestep t_init (SiD-LSG's
`sid_sd_sampler`, Diff-Instruct's `G(init_sigma·z, init_sigma)`): x_init = σ_{t_init}·z, the forward process
applied to x_0 = 0, and g_θ(z, c) = x̂_0(f_θ(x_init, t_init, c)) in the network's own parameterisation (for
rectified flow at σ = 1: x̂_0 = z − v̂, one Euler step from pure noise). Saved as
a pipeline directory plus `one_step.json`; `prefalign generate --generator RUN_DIR` and the bench kind
`one-step:DIR` (prefalign/bench/generators.py) sample it with one denoiser evaluation per image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from prefalign.diffusion.generate import ImageSource, initial_noise
from prefalign.diffusion.models import Conditioning, DiffusionModel
from prefalign.errors import PrefalignError
from prefalign.io import atomic_write_text

META_FILE = "one_step.json"
GENERATOR_DIR = "generator"  # the generator's folder inside a training run directory


def one_step_x0(model: DiffusionModel, z: torch.Tensor, cond: Conditioning, t_init: float) -> torch.Tensor:
    """g_θ(z, c): x̂_0 of the network at x_init = σ_{t_init}·z, t = t_init (differentiable in the weights).

    t_init is on the schedule's axis: an integer VP timestep, or σ·T for rectified flow."""
    dtype = torch.long if model.schedule.kind == "vp" else torch.float32
    t = torch.full((z.shape[0],), t_init, device=z.device, dtype=dtype)
    _, sigma = model.schedule.alpha_sigma(t, like=z)
    return model.predict_x0(sigma * z, t, cond)[0].float()


def initial_timestep(model: DiffusionModel, t_init: float | None = None) -> float:
    """t_init on the schedule's axis, checked to lie in (0, top], top the last training-table entry (VP: T − 1;
    flow: σ = 1, t = T). None: the top, so the generator starts from (nearly) pure noise (x̂_0 stays bounded for
    v-, x_0- and velocity prediction), except 625 for ε-prediction, whose x̂_0 = (x − σε̂)/α explodes near T
    (SiD-LSG's SD1.5 setting)."""
    top = model.schedule.timesteps_from_fraction(torch.ones(1, dtype=torch.float64)).item()
    if t_init is None:
        return 625 if model.prediction_type == "epsilon" else top
    if not 0 < t_init <= top:
        raise PrefalignError(f"generator.t_init={t_init:g} is off the model's axis; use 0 < t_init <= {top:g}")
    return t_init


def one_step_source(model: DiffusionModel, t_init: float, batch_size: int = 64) -> ImageSource:
    """An `ImageSource` (prompts, seeds) → images in [0, 1]; z per seed as the DDIM samplers draw x_T, so one
    seed gives the same image whatever its batch. Carries `nfe = 1` for the leaderboard."""

    @torch.no_grad()
    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(prompts), batch_size):
            cond = model.encode_prompts(prompts[i : i + batch_size])
            z = initial_noise(model.sample_shape, seeds[i : i + batch_size], model.device, model.dtype)
            chunks.append(model.decode(one_step_x0(model, z, cond, t_init)).float().cpu())
        return torch.cat(chunks)

    generate.nfe = 1  # type: ignore[attr-defined]
    return generate


def write_meta(directory: str | Path, t_init: float, extra: Mapping[str, Any]) -> None:
    """Mark a saved pipeline directory as a one-step generator (read back by `load_generator`)."""
    atomic_write_text(Path(directory) / META_FILE, json.dumps({"t_init": t_init, **extra}, indent=2))


def generator_dir(path: str | Path) -> Path | None:
    """The generator folder of `path` (a run directory or the generator folder itself), or None."""
    path = Path(path).expanduser()
    for candidate in (path, path / GENERATOR_DIR):
        if (candidate / META_FILE).is_file() and (candidate / "model_index.json").is_file():
            return candidate.resolve()
    return None


def load_generator(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[DiffusionModel, dict]:
    """(model, meta) of a saved one-step generator; `path` is its run directory or generator folder."""
    root = generator_dir(path)
    if root is None:
        raise PrefalignError(
            f"{path}: no one-step generator ({META_FILE} + model_index.json) here or in {GENERATOR_DIR}/; "
            "pass the run directory of `prefalign align --method dipp`"
        )
    meta = json.loads((root / META_FILE).read_text())
    return DiffusionModel.from_pretrained(root, dtype=dtype, device=device).eval(), meta
