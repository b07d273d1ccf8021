"""CLIPScore with an explicit convention: `scale * max(cos, 0)` (default scale 100, clip at 0).

Conventions in the wild (rewards.md section 5): torchmetrics `CLIPScore` = max(100 cos, 0) on transformers
`openai/clip-vit-large-patch14`; Hessel et al. = 2.5 max(cos, 0); many T2I papers = raw cosine (scale=1,
clip_at_zero=False). Two backbones:
- backend="transformers" (default, torchmetrics-compatible): `checkpoint` is a local transformers CLIP model
  directory (default Hub repo openai/clip-vit-large-patch14), whose processor files are used unless
  `processor=DIR` is given;
- backend="open_clip": `checkpoint` is an open_clip state dict / safetensors for `model_name` (or a JSON
  `model_config`), preprocessed with open_clip's eval transform (shorter side -> bicubic, centre crop).
"""

from __future__ import annotations

from pathlib import Path

import torch

from prefalign.errors import PrefalignError
from prefalign.rewards.base import RewardInfo
from prefalign.rewards.clip_common import (
    ClipLikeReward,
    as_bool,
    as_float,
    build_open_clip,
    open_clip_image_size,
    open_clip_tokenizer,
    open_clip_tower_id,
    read_json,
    resolve_checkpoint,
)
from prefalign.rewards.hps import OpenClipReward, load_open_clip_weights
from prefalign.rewards.pickscore import load_hf_clip_reward, read_image_processor_cfg

HF_DEFAULT_REPO = "openai/clip-vit-large-patch14"
OPEN_CLIP_DEFAULT = (
    "ViT-L-14-quickgelu",
    "timm/vit_large_patch14_clip_224.openai",
    "open_clip_model.safetensors",
)


def load_clipscore(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    backend: str = "transformers",
    processor: str | Path | None = None,
    model_name: str | None = None,
    model_config: str | Path | None = None,
    scale: float | str = 100.0,
    clip_at_zero: bool | str = True,
) -> ClipLikeReward:
    """CLIPScore reward; the convention (scale, clipping) is part of `info.convention`."""
    scale, clip_at_zero = as_float(scale), as_bool(clip_at_zero)
    formula = f"{scale:g} x max(cos, 0)" if clip_at_zero else f"{scale:g} x cos"
    if backend == "transformers":
        model_dir = resolve_checkpoint(
            checkpoint, HF_DEFAULT_REPO, None, "CLIP model directory", "--checkpoint clipscore=DIR"
        )
        processor_dir = Path(processor).expanduser() if processor is not None else model_dir
        cfg = (
            read_json(model_dir / "config.json", "CLIP config")
            if (model_dir / "config.json").exists()
            else {}
        )
        info = RewardInfo(
            name="clipscore",
            version=f"CLIPScore on transformers CLIP {cfg.get('_name_or_path') or model_dir.name}",
            higher_is_better=True,
            input_size=read_image_processor_cfg(processor_dir)["crop"],
            convention=formula,
        )
        return load_hf_clip_reward(
            model_dir, processor_dir, info, device, dtype, scale=scale, clip_at_zero=clip_at_zero
        )
    if backend == "open_clip":
        default_name, repo, filename = OPEN_CLIP_DEFAULT
        name = model_name or default_name
        path = resolve_checkpoint(
            checkpoint, repo, filename, "open_clip weights", "--checkpoint clipscore=PATH"
        )
        model, cfg = build_open_clip(name, model_config)
        load_open_clip_weights(model, path, "open_clip weights", f"the Hub repo {repo}")
        preprocess_cfg = cfg.get("preprocess_cfg", {})
        info = RewardInfo(
            name="clipscore",
            version=f"CLIPScore on open_clip {Path(model_config).stem if model_config else name}",
            higher_is_better=True,
            input_size=open_clip_image_size(cfg),
            convention=formula,
        )
        reward = OpenClipReward(
            model,
            open_clip_tokenizer(cfg),
            info,
            pipeline="center_crop",
            image_size=open_clip_image_size(cfg),
            scale=scale,
            clip_at_zero=clip_at_zero,
            **{k: tuple(preprocess_cfg[k]) for k in ("mean", "std") if k in preprocess_cfg},
        )
        reward.tower_id = open_clip_tower_id(path, cfg)
        return reward.to(device=device, dtype=dtype).eval().requires_grad_(False)
    raise PrefalignError(
        f"clipscore backend '{backend}' is unknown; use backend=transformers or backend=open_clip"
    )
