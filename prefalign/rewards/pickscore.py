"""PickScore (yuvalkirstain/PickScore) and any transformers `CLIPModel` cosine reward.

Official inference (PickScore README, `trainer/scripts/eval_preference_predictor.py`):
`processor = AutoProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")`,
`model = AutoModel.from_pretrained("yuvalkirstain/PickScore_v1")`; images and text go through the processor
(`padding=True, truncation=True, max_length=77`), `get_image_features` / `get_text_features` are L2-normalised
and the score is `model.logit_scale.exp() * cosine`. The pinned transformers 4.27.3 used the slow, PIL-based
`CLIPImageProcessor`: shortest edge -> 224 with PIL bicubic, centre crop with floored offsets, /255, OpenAI
mean/std. That pipeline is re-implemented here (read from the processor's `preprocessor_config.json`) so it
does not depend on which image-processor backend the installed transformers picks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from prefalign.errors import PrefalignError
from prefalign.rewards.base import RewardInfo
from prefalign.rewards.clip_common import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipLikeReward,
    cosine_to_score,
    load_strict,
    load_weights,
    normalize,
    pil_resize_crop,
    read_json,
    require_file,
    resolve_checkpoint,
    tensor_resize_crop,
    tower_identity,
)

PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class HFClipReward(ClipLikeReward):
    """`scale * cos(image, text)` of a transformers CLIPModel; scale=None means `exp(logit_scale)`
    (PickScore)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        info: RewardInfo,
        *,
        image_cfg: dict[str, Any],
        scale: float | None,
        clip_at_zero: bool = False,
    ) -> None:
        super().__init__(info)
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.image_cfg = image_cfg
        self.scale, self.clip_at_zero = scale, clip_at_zero

    def preprocess_pil(self, img: Image.Image) -> torch.Tensor:
        """Slow `CLIPImageProcessor`: PIL bicubic shortest-edge resize, floored centre crop, /255,
        Normalize."""
        c = self.image_cfg
        return normalize(pil_resize_crop(img, c["size"], c["crop"], "floor"), c["mean"], c["std"])

    def preprocess_tensor(self, x: torch.Tensor) -> torch.Tensor:
        c = self.image_cfg
        return normalize(tensor_resize_crop(x, c["size"], c["crop"], "floor"), c["mean"], c["std"])

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        ids = self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.normalize(self.model.text_projection(pooled.pooler_output).float(), dim=-1)

    @property
    def preprocess_key(self) -> tuple:
        c = self.image_cfg
        return ("crop", c["size"], c["crop"], "floor", tuple(c["mean"]), tuple(c["std"]))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return self.model.visual_projection(pooled)

    def reward_from_features(self, features: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = F.normalize(features.float(), dim=-1)
        text = self._encode_unique(prompts, self._encode_text)
        scale = self.model.logit_scale.exp().float() if self.scale is None else self.scale
        return cosine_to_score((image * text).sum(-1), scale, self.clip_at_zero)


def read_image_processor_cfg(processor_dir: Path) -> dict[str, Any]:
    """The slow CLIPImageProcessor settings this adapter reproduces; anything else is refused, not ignored."""
    path = require_file(
        processor_dir / "preprocessor_config.json", "CLIP image processor config", "the processor's Hub repo"
    )
    raw = read_json(path, "CLIP image processor config")
    size, crop = raw.get("size", 224), raw.get("crop_size", 224)
    size = size.get("shortest_edge") if isinstance(size, dict) else size
    crop_hw = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    supported = (
        isinstance(size, int)
        and crop_hw[0] == crop_hw[1]
        and raw.get("resample", 3) == 3  # PIL.Image.BICUBIC
        and all(raw.get(k, True) for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"))
        and abs(raw.get("rescale_factor", 1 / 255) - 1 / 255) < 1e-12
    )
    if not supported:
        raise PrefalignError(
            f"{path}: only the standard CLIP pipeline (bicubic shortest-edge resize, square centre crop, "
            "/255, normalise) is supported"
        )
    mean, std = raw.get("image_mean", OPENAI_MEAN), raw.get("image_std", OPENAI_STD)
    return {"size": size, "crop": int(crop_hw[0]), "mean": tuple(mean), "std": tuple(std)}


def _load_clip_model(model_dir: Path, what: str) -> tuple[torch.nn.Module, Path]:
    """`CLIPModel(config)` + a strict, pickle-free state-dict load (position_ids buffers allowed)."""
    from transformers import CLIPConfig, CLIPModel

    require_file(model_dir / "config.json", f"{what} config.json", "the model's Hub repo")
    model = CLIPModel(CLIPConfig.from_pretrained(str(model_dir), local_files_only=True))
    for name in WEIGHT_FILES:
        path = model_dir / name
        if path.exists():
            break
    else:
        raise PrefalignError(f"{model_dir}: no weights file ({', '.join(WEIGHT_FILES)}) for {what}")
    if path.name.endswith(".index.json"):  # sharded: the index maps every key to a shard file
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state = {
            k: v for s in shards for k, v in load_weights(model_dir / s, what, "the model's Hub repo").items()
        }
    else:
        state = load_weights(path, what, "the model's Hub repo")
    load_strict(model, state, f"{what} {path}", ignore=lambda key: key.endswith("position_ids"))
    return model.eval(), path


def load_hf_clip_reward(
    model_dir: Path,
    processor_dir: Path,
    info: RewardInfo,
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    scale: float | None,
    clip_at_zero: bool,
) -> HFClipReward:
    """Build an HFClipReward from a local model directory and a local processor directory (offline)."""
    from transformers import AutoTokenizer

    image_cfg = read_image_processor_cfg(
        require_file(processor_dir, "CLIP processor directory", "the processor's Hub repo", directory=True)
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(processor_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrefalignError(
            f"no CLIP tokenizer in {processor_dir} (vocab.json + merges.txt): {first}"
        ) from None
    model, weights = _load_clip_model(model_dir, info.name)
    reward = HFClipReward(model, tokenizer, info, image_cfg=image_cfg, scale=scale, clip_at_zero=clip_at_zero)
    reward.tower_id = tower_identity("transformers.clip.vision", weights, model.config.vision_config.to_dict())
    return reward.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_pickscore(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    processor: str | Path | None = None,
) -> HFClipReward:
    """PickScore_v1: `checkpoint` is a local copy of the Hub repo yuvalkirstain/PickScore_v1 (config.json +
    weights), `processor` one of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer +
    preprocessor_config.json)."""
    model_dir = resolve_checkpoint(
        checkpoint, PICKSCORE_REPO, None, "PickScore model directory", "--checkpoint pickscore=DIR"
    )
    processor_dir = resolve_checkpoint(
        processor,
        PICKSCORE_PROCESSOR_REPO,
        None,
        "CLIP-H processor directory",
        "--option pickscore.processor=DIR",
    )
    info = RewardInfo(
        name="pickscore",
        version=f"PickScore_v1 ({model_dir.name})",
        higher_is_better=True,
        input_size=read_image_processor_cfg(processor_dir)["crop"],
        convention="exp(logit_scale) x cosine (official; t2v_metrics reports the bare cosine)",
    )
    return load_hf_clip_reward(model_dir, processor_dir, info, device, dtype, scale=None, clip_at_zero=False)
