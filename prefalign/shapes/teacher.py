"""The shapes teacher: a pixel-space text-to-image diffusion model built from the same parts as Stable Diffusion.

A diffusers `UNet2DConditionModel` (cross-attention on CLIP text states) and a transformers `CLIPTextModel` behind
`prefalign.diffusion.models.DiffusionModel` (family "pixel": no VAE, x_0 = 2·image − 1), so every trainer line
exercised in the shapes world is the line that runs on Stable Diffusion. The shipped checkpoint lives in
`prefalign/assets/shapes_teacher/` and is reproduced by `prefalign shapes pretrain` with the defaults.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from prefalign.diffusion.models import DiffusionModel, scheduler_settings
from prefalign.errors import PrefalignError
from prefalign.shapes.tokenizer import SPECIAL_TOKENS, shapes_tokenizer

SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "shapes_teacher"

# Small enough to pretrain on a 2-core CPU. Capacity sits where it is cheap: four levels (32 → 16 → 8 → 4), with
# self- and cross-attention at 8×8 and 4×4, where relations between objects span the whole feature map for a few
# tokens' cost (attention at 16×16 tripled the step time; this arch costs ≈ 0.32 CPU-s per step of 32).
DEFAULT_ARCH: dict = {
    "family": "vp",  # vp: the DDIM scheduler below; flow: rectified flow (FLOW_SCHEDULER), as SD3 / FLUX
    "image_size": 32,
    "max_length": 24,
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "unet": {
        "block_out_channels": [16, 32, 64, 128],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "attention_head_dim": 16,
        "norm_num_groups": 8,
    },
    # The cosine schedule suits small images (Nichol & Dhariwal 2021). v-prediction keeps x̂_0 accurate at the
    # schedule's very low SNRs, where ε-prediction amplifies errors by σ/α (Salimans & Ho 2022): an ε-model
    # trained for the same budget sampled noise. DDIM "leading" spacing as in SD.
    "scheduler": {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "leading",
    },
}


# Rectified flow x_t = (1 − σ) x_0 + σ ε with velocity prediction, Euler sampling; no shift at 32×32.
FLOW_SCHEDULER: dict = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


def tiny_arch() -> dict:
    """`DEFAULT_ARCH` at test widths: the same blocks, attention placement and schedule, a few thousand weights."""
    arch = copy.deepcopy(DEFAULT_ARCH)
    arch["unet"].update(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, attention_head_dim=8)
    arch["text"].update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return arch


def build_teacher(arch: dict | None = None, seed: int = 0) -> DiffusionModel:
    """A randomly initialised teacher with architecture `arch` (defaults: `DEFAULT_ARCH`)."""
    arch = arch or DEFAULT_ARCH
    torch.manual_seed(seed)
    tokenizer = shapes_tokenizer(arch["max_length"])
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=arch["max_length"],
        pad_token_id=ids["[PAD]"],
        bos_token_id=ids["[BOS]"],
        eos_token_id=ids["[EOS]"],
        **arch["text"],
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=arch["image_size"],
        in_channels=3,
        out_channels=3,
        cross_attention_dim=arch["text"]["hidden_size"],
        **{k: tuple(v) if isinstance(v, list) else v for k, v in arch["unet"].items()},
    )
    family = arch.get("family", "vp")
    if family not in ("vp", "flow"):
        raise PrefalignError(f"arch.family '{family}' unknown; use vp or flow")
    scheduler = FLOW_SCHEDULER if family == "flow" else arch["scheduler"]
    schedule, prediction_type = scheduler_settings(scheduler)
    return DiffusionModel(
        unet, schedule, prediction_type, [text_encoder], [tokenizer], vae=None, family="pixel",
        sample_size=arch["image_size"], scheduler_config=dict(scheduler),
    )


def load_teacher(path: str | Path | None = None, device: torch.device | str = "cpu") -> DiffusionModel:
    """Load a teacher pipeline directory (default: the checkpoint shipped with the package)."""
    path = Path(path) if path is not None else SHIPPED_TEACHER
    if not (path / "model_index.json").is_file():
        hint = "run `prefalign shapes pretrain --out DIR` to create one" if path == SHIPPED_TEACHER else "check the path"
        raise PrefalignError(f"no shapes teacher at {path} (model_index.json missing); {hint}")
    return DiffusionModel.from_pretrained(path, device=device)


def text_states(model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
    """CLIP text states, with gradients when the encoder is trainable (`encode_prompts` is always no-grad)."""
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())):
        return encoder(tokens.input_ids.to(model.device))[0]
