"""HPS v2 / v2.1 (tgxs002/HPSv2) and any open_clip CLIP cosine reward.

Official scoring (`hpsv2/img_score.py::score`): open_clip ViT-H-14 built with `pretrained=None`,
`model.load_state_dict(torch.load(cp)['state_dict'])` (strict), `preprocess_val` from
`image_transform(224, is_train=False, resize_longest_max=True)` (ToTensor -> tensor bicubic resize of the
longer side -> black letterbox -> OpenAI Normalize), open_clip's BPE tokenizer (77 tokens), and
`diagonal(image_features @ text_features.T)` of the L2-normalised features: the raw cosine. The benchmark
tables (`evaluation.py`) report it x100. The official code runs under `torch.cuda.amp.autocast()`, i.e. fp16
compute on GPU and fp32 on CPU; this adapter computes in the dtype it is loaded with.

The `hpsv2` package itself is not imported (its wheel lacks the BPE vocabulary and `factory.py` imports
tkinter, rewards.md section 2.5); open_clip provides the identical architecture and tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from prefalign.errors import PrefalignError
from prefalign.rewards.base import RewardInfo
from prefalign.rewards.clip_common import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipLikeReward,
    as_bool,
    as_float,
    build_open_clip,
    cosine_to_score,
    letterbox,
    load_strict,
    load_weights,
    normalize,
    open_clip_image_size,
    open_clip_tokenizer,
    open_clip_tower_id,
    pil_resize_crop,
    resolve_checkpoint,
    tensor_resize_crop,
)

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_REWARDS = {"v2.0": "hpsv2", "v2.1": "hpsv2.1"}  # registry names, which --checkpoint NAME=PATH takes

Pipeline = Literal["letterbox", "center_crop"]


class OpenClipReward(ClipLikeReward):
    """`scale * cos(image, text)` (optionally clipped at 0) of an open_clip CLIP model.

    pipeline="letterbox" is HPS's `preprocess_val`; "center_crop" is open_clip's / OpenAI's eval transform.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        info: RewardInfo,
        *,
        pipeline: Pipeline,
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        scale: float = 1.0,
        clip_at_zero: bool = False,
        antialias: bool = True,
    ) -> None:
        super().__init__(info)
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length
        self.pipeline = pipeline
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.clip_at_zero, self.antialias = scale, clip_at_zero, antialias

    def preprocess_pil(self, img: Image.Image) -> torch.Tensor:
        """The official eval transform for one RGB image (HPS: ToTensor before a tensor resize)."""
        if self.pipeline == "letterbox":
            x = letterbox(TF.to_tensor(img), self.image_size, self.antialias)
        else:
            x = pil_resize_crop(img, self.image_size, self.image_size, "round")
        return normalize(x, self.mean, self.std)

    def preprocess_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.pipeline == "letterbox"
        ):  # already tensor ops in the official code: identical up to 8-bit input
            x = letterbox(x, self.image_size, self.antialias)
        else:
            x = tensor_resize_crop(x, self.image_size, self.image_size, "round")
        return normalize(x, self.mean, self.std)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        return [len(self.tokenizer.encode(p)) + 2 for p in prompts]

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @property
    def preprocess_key(self) -> tuple:
        if self.pipeline == "letterbox":
            return ("letterbox", self.image_size, self.antialias, self.mean, self.std)
        return ("crop", self.image_size, self.image_size, "round", self.mean, self.std)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device, self.dtype))

    def reward_from_features(self, features: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = F.normalize(features.float(), dim=-1)
        text = self._encode_unique(prompts, self._encode_text)
        return cosine_to_score((image * text).sum(-1), self.scale, self.clip_at_zero)


def load_open_clip_weights(model: torch.nn.Module, checkpoint: Path, what: str, source: str) -> None:
    """Strictly load an open_clip / OpenAI-layout CLIP state dict (HPS keeps it under 'state_dict')."""
    state = load_weights(checkpoint, what, source)
    # OpenAI JIT-exported state dicts carry three int metadata entries open_clip drops too.
    meta = {"input_resolution", "context_length", "vocab_size"}
    load_strict(model, state, what, ignore=lambda key: key in meta)


def load_hps(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    version: str = "v2.1",
    model_name: str = "ViT-H-14",
    model_config: str | Path | None = None,
    scale: float | str = 1.0,
    antialias: bool | str = True,
) -> OpenClipReward:
    """HPS v2.0 / v2.1 reward (`hpsv2.score` semantics: cosine; scale=100 gives the benchmark-table numbers).

    antialias=True matches the official code on torchvision >= 0.17 (tensor resize default); False reproduces
    installs with older torchvision, which did not antialias tensors.
    """
    if version not in HPS_FILES:
        raise PrefalignError(f"HPS version '{version}' is unknown; use one of {sorted(HPS_FILES)}")
    path = resolve_checkpoint(
        checkpoint,
        HPS_REPO,
        HPS_FILES[version],
        f"HPS {version} checkpoint",
        f"--checkpoint {HPS_REWARDS[version]}=PATH",
    )
    model, cfg = build_open_clip(model_name, model_config)
    load_open_clip_weights(model, path, f"HPS {version} checkpoint", f"the Hub repo {HPS_REPO}")
    scale = as_float(scale)
    convention = (
        "cosine x 100 (HPS benchmark tables)" if scale == 100 else f"cosine x {scale:g} (hpsv2.score API)"
    )
    info = RewardInfo(
        name=HPS_REWARDS[version],
        version=f"HPS {version} ({path.name}, open_clip {model_name if model_config is None else 'custom'})",
        higher_is_better=True,
        input_size=open_clip_image_size(cfg),
        convention=convention,
    )
    reward = OpenClipReward(
        model,
        open_clip_tokenizer(cfg),
        info,
        pipeline="letterbox",
        image_size=open_clip_image_size(cfg),
        scale=scale,
        antialias=as_bool(antialias),
    )
    reward.tower_id = open_clip_tower_id(path, cfg)
    return (
        reward.to(device=device, dtype=dtype).eval().requires_grad_(False)
    )  # frozen: gradients go to pixels only


def load_hpsv2(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> OpenClipReward:
    """Registry entry `hpsv2` (checkpoint HPS_v2_compressed.pt)."""
    return load_hps(checkpoint, device, dtype, version="v2.0", **options)


def load_hpsv21(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> OpenClipReward:
    """Registry entry `hpsv2.1` (checkpoint HPS_v2.1_compressed.pt)."""
    return load_hps(checkpoint, device, dtype, version="v2.1", **options)
