"""Aligned teachers shipped with the package: small checkpoints made by the full trainer benchmark.

Each lives in `assets/shapes_aligned/<name>/` as the trained model's UNet update against the shipped teacher
(`unet_delta.safetensors`: int8 codes with one fp32 scale per output channel, a quarter of fp32 weights) and
`aligned.json`: how it was made, how it samples, and what it scored on held-out prompts. Loading adds the update
to the teacher's weights; `benchmarks/ship_aligned.py` scores the unpacked model, so the numbers in `aligned.json`
are those of the model the demo runs, not of the unpacked original. The text encoder, tokenizer and scheduler are
the teacher's (the trainers leave them frozen; packing checks it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prefalign.diffusion.generate import ImageSource
from prefalign.diffusion.models import DiffusionModel
from prefalign.diffusion.one_step import one_step_source
from prefalign.errors import PrefalignError
from prefalign.io import atomic_path, atomic_write_text
from prefalign.shapes.generators import model_source
from prefalign.shapes.teacher import load_teacher

SHIPPED_ALIGNED = Path(__file__).resolve().parents[1] / "assets" / "shapes_aligned"
DELTA_FILE, META_FILE = "unet_delta.safetensors", "aligned.json"


def pack_update(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tuned − base` per tensor as int8 codes (`name.q`, rows = output channels) and fp32 scales (`name.scale`,
    max |Δ| of the row / 127): the rounding error is at most half a step, ≤ 0.4 % of the row's largest update."""
    if base.keys() != tuned.keys():
        raise PrefalignError("the tuned UNet's weights do not match the teacher's; pack a model of the same "
                             "architecture")
    packed = {}
    for name, weight in tuned.items():
        delta = weight.float() - base[name].float()
        rows = delta.reshape(delta.shape[0] if delta.ndim > 1 else 1, -1)
        scale = rows.abs().amax(dim=1).clamp_min(1e-30) / 127
        packed[f"{name}.q"] = torch.round(rows / scale[:, None]).to(torch.int8).contiguous()
        packed[f"{name}.scale"] = scale
    return packed


def unpack_update(base: dict[str, torch.Tensor], packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tuned weights (fp32) of `pack_update`'s output."""
    return {name: weight.float() + (packed[f"{name}.q"].float() * packed[f"{name}.scale"][:, None]).reshape(
        weight.shape) for name, weight in base.items()}


def save_aligned(model: DiffusionModel, out_dir: str | Path, meta: dict[str, Any]) -> None:
    """Pack `model`'s UNet against the shipped teacher into `out_dir` with `meta` (written last, atomically: a
    folder without it is not a checkpoint). `meta` needs `sampler`: {steps, guidance} or {one_step: t_init}."""
    if "sampler" not in meta:
        raise PrefalignError("aligned checkpoint meta needs 'sampler': {steps, guidance} or {one_step: t_init}")
    teacher = load_teacher()
    frozen = teacher.text_encoders[0].state_dict()
    for name, weight in model.text_encoders[0].state_dict().items():
        if not torch.equal(weight.float(), frozen[name].float()):
            raise PrefalignError(f"text encoder weight {name} differs from the teacher's; only UNet updates pack")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    packed = pack_update(teacher.denoiser.state_dict(), model.denoiser.state_dict())
    with atomic_path(out_dir / DELTA_FILE) as tmp:
        save_file(packed, str(tmp))
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")


def aligned_dir(name: str | Path) -> Path:
    """A shipped checkpoint's folder by name (dpo, spo, dipp, diff-instruct), or a folder path."""
    folder = SHIPPED_ALIGNED / str(name) if (SHIPPED_ALIGNED / str(name)).is_dir() else Path(name)
    if not (folder / META_FILE).is_file() or not (folder / DELTA_FILE).is_file():
        shipped = sorted(p.name for p in SHIPPED_ALIGNED.glob("*") if (p / META_FILE).is_file())
        raise PrefalignError(f"no aligned checkpoint '{name}' ({META_FILE} + {DELTA_FILE}); shipped: "
                             f"{', '.join(shipped) or 'none'}")
    return folder


def load_aligned(name: str | Path, device: torch.device | str = "cpu") -> tuple[DiffusionModel, dict[str, Any]]:
    """(model, meta): the shipped teacher with the checkpoint's UNet update applied, in eval mode."""
    folder = aligned_dir(name)
    model = load_teacher(device="cpu")
    weights = unpack_update(model.denoiser.state_dict(), load_file(str(folder / DELTA_FILE)))
    model.denoiser.load_state_dict(weights)
    return model.to(device).eval(), json.loads((folder / META_FILE).read_text())


def aligned_source(name: str | Path, device: torch.device | str = "cpu", batch_size: int = 64,
                   sampler: dict | None = None) -> tuple[ImageSource, dict[str, Any]]:
    """(image source, meta): the checkpoint sampled as its trainer sampled it (`meta["sampler"]`); `sampler`
    ({steps, guidance, eta}) overrides that for a multi-step checkpoint, e.g. to sample it like the teacher."""
    model, meta = load_aligned(name, device)
    if "one_step" in meta["sampler"]:
        return one_step_source(model, float(meta["sampler"]["one_step"]), batch_size), meta
    sampler = {**meta["sampler"], **(sampler or {})}
    return model_source(model, int(sampler["steps"]), float(sampler["guidance"]), float(sampler.get("eta", 0.0)),
                        batch_size), meta
