"""Shared machinery of the CLIP-family rewards: preprocessing, safe checkpoint loading, the batched score
loop.

Three image pipelines cover the official implementations:
- OpenAI CLIP `_transform` / open_clip eval (aesthetic, CLIPScore on open_clip): PIL bicubic resize of the
  shorter side, torchvision `CenterCrop` (offset rounded), ToTensor, Normalize;
- transformers' slow `CLIPImageProcessor` (PickScore, CLIPScore on transformers): the same PIL resize but the
  crop offset is floored (`transformers.image_transforms.center_crop`), so odd margins shift by one pixel;
- HPS v2 `image_transform(resize_longest_max=True)`: ToTensor first, then a *tensor* bicubic resize of the
  longer side and a black letterbox (`hpsv2/src/open_clip/transform.py::ResizeMaxSize`).
Each has a torch-only twin for `differentiable` (bicubic with antialias, which follows PIL's kernel but skips
PIL's 8-bit intermediate rounding).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from prefalign.errors import PrefalignError
from prefalign.rewards.base import ImageLike, RewardInfo, RewardModel
from prefalign.rewards.checkpoints import (  # noqa: F401  (re-exported: adapters import them from here)
    hub_offline,
    load_strict,
    load_weights,
    read_json,
    require_file,
    resolve_checkpoint,
)
from prefalign.rewards.images import load_rgb

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

CropRounding = Literal["round", "floor"]


# --------------------------------------------------------------------------------------------- preprocessing
def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to `size`: torchvision `_compute_resized_output_size` and
    transformers `get_resize_output_image_size(default_to_square=False)` agree (long side truncated with
    int())."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def crop_offsets(height: int, width: int, crop: int, rounding: CropRounding) -> tuple[int, int]:
    """Top/left of a centred `crop`: torchvision rounds (half to even), transformers floors."""
    if rounding == "round":
        return round((height - crop) / 2.0), round((width - crop) / 2.0)
    return (height - crop) // 2, (width - crop) // 2


def pil_resize_crop(img: Image.Image, size: int, crop: int, rounding: CropRounding) -> torch.Tensor:
    """PIL bicubic shorter-side resize + centre crop -> float [3, crop, crop] in [0, 1] (ToTensor).

    Reproduces `Resize(size, BICUBIC) -> CenterCrop(crop) -> ToTensor()` on PIL images (OpenAI CLIP
    `_transform`) with rounding="round", and `CLIPImageProcessor` resize/center_crop/rescale with
    rounding="floor".
    """
    h, w = shorter_side_size(img.height, img.width, size)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.BICUBIC)
    top, left = crop_offsets(h, w, crop, rounding)
    arr = np.asarray(img, dtype=np.uint8)[top : top + crop, left : left + crop]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # copy: PIL arrays are read-only


def tensor_resize_crop(x: torch.Tensor, size: int, crop: int, rounding: CropRounding) -> torch.Tensor:
    """Differentiable twin of `pil_resize_crop` for [B, 3, H, W] in [0, 1] (bicubic, antialias like PIL)."""
    h, w = shorter_side_size(x.shape[-2], x.shape[-1], size)
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    top, left = crop_offsets(h, w, crop, rounding)
    return x[..., top : top + crop, left : left + crop]


def letterbox(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """HPS `ResizeMaxSize(size, BICUBIC, fill=0)` on a float tensor [..., 3, H, W].

    The official transform skips resizing *and padding* when the longer side already equals `size`, which
    makes non-square inputs crash its model; here such images are padded too.
    """
    height, width = x.shape[-2:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = [round(height * scale), round(width * scale)]
        x = TF.resize(x, new_size, InterpolationMode.BICUBIC, antialias=antialias)
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """torchvision `Normalize` over the channel dimension (dim -3)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


# ------------------------------------------------------------------------------------------ shared towers
def tower_identity(kind: str, weights: Path, config: Mapping) -> tuple:
    """`tower_id` of an image tower: its implementation, weights file (path, size, mtime) and config."""
    stat = weights.stat()
    return (kind, str(weights.resolve()), stat.st_size, stat.st_mtime_ns, json.dumps(config, sort_keys=True))


# -------------------------------------------------------------------------------------------- the base class
def check_prompts(prompts: Sequence[str], token_counts: Sequence[int], limit: int, reward: str) -> None:
    """Warn about prompts the tokenizer will truncate (to `limit` tokens incl. start/end) or that are
    empty."""
    # Messages name the prompt, not its index, so Python's once-per-message filter reports each prompt once.
    for prompt, count in zip(prompts, token_counts, strict=True):
        if not prompt.strip():
            warnings.warn(f"{reward}: empty prompt; scored against the empty text", stacklevel=2)
        elif count > limit:
            warnings.warn(
                f"{reward}: prompt {prompt[:50]!r}... has {count} tokens; truncated to {limit} "
                "as the official tokenizer does",
                stacklevel=2,
            )


def cosine_to_score(cos: torch.Tensor, scale: float, clip_at_zero: bool) -> torch.Tensor:
    """`scale * cos`, optionally `max(., 0)` (CLIPScore: Hessel et al. w=2.5; torchmetrics 100)."""
    score = cos * scale
    return score.clamp_min(0.0) if clip_at_zero else score


class ClipLikeReward(RewardModel):
    """A reward computed from an image tower (and usually a text tower) on a fixed-size normalised input.

    Subclasses provide `preprocess_pil` (the official no-grad pipeline, one image), `preprocess_tensor` (its
    torch-only twin for a batch) and `reward_from_pixels`; this class supplies batching and input checks.
    """

    uses_prompts = True
    context_length = 77

    def __init__(self, info: RewardInfo) -> None:
        super().__init__()
        self.info = info

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def preprocess_pil(self, img: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def preprocess_tensor(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reward_from_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Rewards of preprocessed pixels; by default the image tower, then the head/text side."""
        return self.reward_from_features(self.encode_image(pixels), prompts)

    # Rewards that run the same image tower on the same pixels share one forward in a multi-reward pass
    # (prefalign.rewards.multi): `tower_id` names the tower (weights file, config, dtype); None shares nothing.
    tower_id: tuple | None = None

    @property
    def preprocess_key(self) -> tuple | None:
        """Equal keys mean `preprocess_pil` gives identical tensors, so one preprocessing serves both."""
        return None

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reward_from_features(self, features: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def warn_prompts(self, prompts: Sequence[str]) -> None:
        """The official tokenizer's truncation and empty-prompt warnings for one batch of prompts."""
        if self.uses_prompts:
            check_prompts(prompts, self.token_counts(prompts), self.context_length, self.name)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens per prompt before truncation, start/end tokens included."""
        raise NotImplementedError

    def _check_batch(self, n_images: int, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts] * n_images
        prompts = list(prompts)
        if len(prompts) != n_images:
            raise PrefalignError(
                f"{self.name}: got {n_images} images but {len(prompts)} prompts; pass one per image"
            )
        return prompts

    @torch.no_grad()
    def score(
        self, images: Sequence[ImageLike], prompts: Sequence[str], batch_size: int = 16
    ) -> torch.Tensor:
        """Batched no-grad scores with the official preprocessing (see the module docstring)."""
        prompts = self._check_batch(len(images), prompts)
        self.warn_prompts(prompts)
        out = []
        for start in range(0, len(images), max(1, batch_size)):
            chunk = [load_rgb(images[i]) for i in range(start, min(start + batch_size, len(images)))]
            pixels = torch.stack([self.preprocess_pil(img) for img in chunk])
            out.append(self.reward_from_pixels(pixels, prompts[start : start + len(chunk)]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def differentiable(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores with gradients w.r.t. `images` ([B, 3, H, W] floats in [0, 1]); torch-only preprocessing."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise PrefalignError(f"{self.name}.differentiable needs a [B, 3, H, W] float tensor, got {shape}")
        prompts = self._check_batch(images.shape[0], prompts)
        return self.reward_from_pixels(self.preprocess_tensor(images), prompts).float()

    def _encode_unique(
        self, prompts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]
    ) -> torch.Tensor:
        """Encode each distinct prompt once (benchmarks score many images per prompt); rows follow
        `prompts`."""
        unique = list(dict.fromkeys(prompts))
        feats = encode(unique)
        index = torch.tensor([unique.index(p) for p in prompts], device=feats.device)
        return feats.index_select(0, index)


def as_bool(value: object) -> bool:
    """An option value from Python or from the CLI (`--option clipscore.clip_at_zero=false`)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def as_float(value: object) -> float:
    """A finite float option value from Python or from the CLI."""
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PrefalignError(f"option value {value!r} must be a number") from None
    if not math.isfinite(result):
        raise PrefalignError(f"option value {value!r} must be a finite number")
    return result


# ------------------------------------------------------------------------------------------ open_clip models
def build_open_clip(model_name: str, model_config: str | Path | None) -> tuple[torch.nn.Module, dict]:
    """An untrained open_clip `CLIP` from a bundled config name or a JSON config file (open_clip's format,
    optionally wrapped as {"model_cfg": ...} like `open_clip_config.json`); nothing is downloaded."""
    import open_clip

    if model_config is not None:
        path = require_file(model_config, "open_clip model config", "open_clip's model_configs/ directory")
        cfg = read_json(path, "open_clip model config")
        cfg = cfg.get("model_cfg", cfg)
    else:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise PrefalignError(
                f"unknown open_clip model '{model_name}'; use a name from open_clip.list_models() or pass "
                "model_config=PATH.json"
            )
    text_cfg = cfg.get("text_cfg", {})
    if cfg.get("custom_text") or "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
        raise PrefalignError(
            f"open_clip model '{model_name}' uses a Hugging Face text tower, which is not supported"
        )
    fields = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")
    model = open_clip.model.CLIP(**{k: cfg[k] for k in fields if k in cfg})
    return model.eval(), cfg


def open_clip_tokenizer(cfg: Mapping) -> Any:
    """open_clip's CLIP BPE tokenizer (vocabulary shipped inside the open_clip package)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=cfg.get("text_cfg", {}).get("context_length", 77))


def open_clip_tower_id(weights: Path, cfg: Mapping) -> tuple:
    """`tower_id` of an open_clip image tower loaded from `weights` with model config `cfg`."""
    return tower_identity("open_clip.visual", weights, {k: cfg.get(k) for k in ("embed_dim", "vision_cfg", "quick_gelu")})


def open_clip_image_size(cfg: Mapping) -> int:
    size = cfg["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def write_clip_processor_files(out_dir: str | Path, image_size: int = 224) -> Path:
    """Write a transformers CLIP processor directory offline: CLIPTokenizer `vocab.json`/`merges.txt` rebuilt
    from the BPE vocabulary open_clip ships (the standard 49408-token OpenAI CLIP vocabulary, same
    construction as `open_clip.tokenizer.SimpleTokenizer`) plus the standard CLIPImageProcessor settings
    (bicubic shortest edge, square centre crop, OpenAI mean/std). Tests and benchmarks use it; nothing is
    downloaded."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe()) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = [*byte_tokens, *(t + "</w>" for t in byte_tokens), *(m.replace(" ", "") for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    special["pad_token"] = "<|endoftext|>"
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    tok_cfg = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "errors": "replace"}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    image_cfg = {
        "processor_class": "CLIPProcessor",
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=1))
    return out
