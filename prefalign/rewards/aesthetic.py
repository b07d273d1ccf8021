"""LAION improved aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor,
`simple_inference.py`).

Official path: `clip.load("ViT-L/14")` (OpenAI CLIP, QuickGELU) -> `encode_image(preprocess(pil))` ->
`normalized()` (numpy L2 norm, zero norms left as is) -> `MLP(768)` whose ReLUs are all commented out ->
raw score on the AVA 1-10 scale. The head checkpoint `sac+logos+ava1-l14-linearMSE.pth` is a plain state dict
(`layers.{0,2,4,6,7}.{weight,bias}`) saved from CUDA, so it is read with `map_location="cpu"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from prefalign.errors import PrefalignError
from prefalign.rewards.base import RewardInfo
from prefalign.rewards.clip_common import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipLikeReward,
    build_open_clip,
    load_strict,
    load_weights,
    normalize,
    open_clip_image_size,
    open_clip_tower_id,
    pil_resize_crop,
    resolve_checkpoint,
    tensor_resize_crop,
)

HEAD_SOURCE = (
    "the GitHub repo christophschuhmann/improved-aesthetic-predictor (sac+logos+ava1-l14-linearMSE.pth)"
)
# open_clip's own Hub copy of the OpenAI ViT-L/14 weights (`pretrained="openai"` resolves to it).
CLIP_REPO, CLIP_FILE = "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"


class AestheticHead(nn.Module):
    """`MLP` of simple_inference.py: five Linear layers, dropouts between, no activations (they are commented
    out upstream), so in eval mode the head is affine. Layer indices match the checkpoint keys."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticReward(ClipLikeReward):
    """Prompt-independent aesthetic score: head(normalised CLIP image embedding), computed in fp32."""

    uses_prompts = False

    def __init__(self, visual: nn.Module, head: AestheticHead, info: RewardInfo, image_size: int) -> None:
        super().__init__(info)
        self.visual = visual
        self.head = head
        self.image_size = image_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    def preprocess_pil(self, img: Image.Image) -> torch.Tensor:
        """OpenAI CLIP `_transform`: Resize(224, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize."""
        return normalize(
            pil_resize_crop(img, self.image_size, self.image_size, "round"), OPENAI_MEAN, OPENAI_STD
        )

    def preprocess_tensor(self, x: torch.Tensor) -> torch.Tensor:
        x = tensor_resize_crop(x, self.image_size, self.image_size, "round")
        return normalize(x, OPENAI_MEAN, OPENAI_STD)

    @property
    def preprocess_key(self) -> tuple:
        return ("crop", self.image_size, self.image_size, "round", OPENAI_MEAN, OPENAI_STD)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding (open_clip `encode_image` without normalisation)."""
        return self.visual(pixels.to(self.device, self.dtype))

    def reward_from_features(self, features: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        emb = features.float()
        norm = emb.norm(dim=-1, keepdim=True)
        emb = emb / torch.where(norm == 0, torch.ones_like(norm), norm)  # `normalized()`: l2[l2 == 0] = 1
        return self.head(emb.to(self.head.layers[0].weight.dtype)).squeeze(-1).float()


def load_aesthetic(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    clip_checkpoint: str | Path | None = None,
    model_name: str = "ViT-L-14-quickgelu",
    model_config: str | Path | None = None,
) -> AestheticReward:
    """LAION aesthetic v2: `checkpoint` is the head (.pth); `clip_checkpoint` the OpenAI ViT-L/14 image tower
    in open_clip layout (safetensors or a plain state dict; the Hub copy when online). `dtype` applies to the
    CLIP tower; the head stays fp32 as in the official code."""
    if checkpoint is None:
        raise PrefalignError(
            "aesthetic needs two files: no LAION aesthetic head given: pass --checkpoint aesthetic=PATH "
            f"(from {HEAD_SOURCE}), and the CLIP tower --option aesthetic.clip_checkpoint=PATH "
            f"({CLIP_FILE} from the Hub repo {CLIP_REPO}; fetched when online)"
        )
    # Both files are checked before the big tower is built or read.
    head_state = load_weights(checkpoint, "LAION aesthetic head", HEAD_SOURCE, "--checkpoint aesthetic=PATH")
    clip_path = resolve_checkpoint(
        clip_checkpoint,
        CLIP_REPO,
        CLIP_FILE,
        "OpenAI CLIP ViT-L/14 weights (aesthetic's second file)",
        "--option aesthetic.clip_checkpoint=PATH",
    )
    model, cfg = build_open_clip(model_name, model_config)
    state = load_weights(
        clip_path, "CLIP image tower", f"the Hub repo {CLIP_REPO}", "--option aesthetic.clip_checkpoint=PATH"
    )
    visual_state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    # Only the image tower is used; text-tower keys in a full CLIP checkpoint are ignored on purpose.
    load_strict(model.visual, visual_state, f"CLIP image tower {clip_path}")
    head = AestheticHead(cfg["embed_dim"])
    load_strict(head, head_state, "LAION aesthetic head")
    info = RewardInfo(
        name="aesthetic",
        version=f"LAION improved-aesthetic-predictor v2 ({Path(checkpoint).name}) on CLIP {model_name}",
        higher_is_better=True,
        input_size=open_clip_image_size(cfg),
        convention="raw regression score, AVA 1-10 scale",
    )
    reward = AestheticReward(model.visual.to(dtype=dtype), head, info, open_clip_image_size(cfg))
    reward.tower_id = open_clip_tower_id(clip_path, cfg)  # shared with clipscore on the same weights
    return reward.to(device).eval().requires_grad_(False)
