"""HPSv3 (Ma et al. 2025): Qwen2-VL-7B-Instruct + an MLP head read at a `<|Reward|>` token.

Reproduces the official `hpsv3` 1.0.0 (`HPSv3RewardInferencer.reward`, `Qwen2VLRewardModelBT.forward`; facts in
../shared/reference/flow_grpo_hpsv3.md §6) on the Qwen2-VL modules of transformers 5.x:
- image: RGB, `smart_resize` to 200704 pixels with sides multiples of 28 (square inputs -> 448², but 768² ->
  420²), PIL bicubic, rescale + CLIP normalise, Qwen2-VL patching (the frame is duplicated for the temporal
  patch of 2; 2x2 merge order) -> 256 or fewer merged image tokens;
- text: the Qwen2-VL chat template (default system turn, image, then the official rubric with the prompt and
  "Please provide the overall ratings of this image: <|Reward|>", assistant generation prompt), right padded;
- positions: HPSv3's forward embeds the image itself and calls the text model without position ids, so it runs
  plain positions 0..L-1 on all three M-RoPE sections, not Qwen2-VL's 3-D `get_rope_index`; kept here;
- output: the fp32 head on the last hidden state at `<|Reward|>` -> [μ, log σ]; the reward is μ (unbounded,
  Bradley–Terry scale; no official normalisation).
`differentiable` uses the official `fetch_image` branch for tensors (torchvision bicubic, antialias) without
the uint8 rounding of `score`; the two agree to 1e-6 at a 448² input (or any size smart_resize keeps) and to
2.1e-4 on the resized fixtures. The official `differentiable=True` processor resizes bilinearly instead; it is
not reproduced.
Parity with the official code (|Δ| ≤ 3e-7 measured, 1e-4 asserted, fp32; tokens and patches exact) is proven by
tests/test_rewards_hpsv3.py against numbers that benchmarks/hpsv3_parity_fixtures.py recorded from it on a tiny
random Qwen2-VL reward model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from prefalign.errors import PrefalignError
from prefalign.rewards.base import ImageLike, RewardInfo, RewardModel
from prefalign.rewards.checkpoints import load_strict, load_weights, require_file
from prefalign.rewards.images import load_rgb

WEIGHTS_FILE = "HPSv3.safetensors"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PIXELS = 256 * 28 * 28  # the official min_pixels = max_pixels
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
UNUSED_OFFICIAL_KEYS = frozenset({"lm_head.weight"})  # the language-model head: the reward never decodes
_SOURCE = "the Hub repo MizzenAI/HPSv3"
_BASE_SOURCE = "the Hub repo Qwen/Qwen2-VL-7B-Instruct (config.json and tokenizer files; no weights needed)"

# hpsv3/dataset/data_collator_qwen.py: INSTRUCTION and prompt_with_special_token, verbatim (trailing spaces too)
INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
REWARD_SUFFIX = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"


def chat_text(prompt: str) -> str:
    """The official message rendered by Qwen2-VL-7B-Instruct's chat template (add_generation_prompt=True),
    with one `<|image_pad|>` that `encode` expands to the image's token count as the processor does."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>" + INSTRUCTION.format(text_prompt=prompt)
            + REWARD_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n")


def smart_resize(height: int, width: int, factor: int = 28, pixels: int = IMAGE_PIXELS) -> tuple[int, int]:
    """qwen-vl-utils `smart_resize` (vendored in hpsv3/dataset/utils.py) with min_pixels = max_pixels."""
    if max(height, width) / min(height, width) > 200:
        raise PrefalignError(f"HPSv3: image of {width}x{height} has an aspect ratio above 200 (the official limit)")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > pixels:  # floor after dividing (768² -> 420², not 448²: kept as upstream computes it)
        beta = math.sqrt(height * width / pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < pixels:
        beta = math.sqrt(pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(pixels: torch.Tensor, patch: int = 14, temporal: int = 2, merge: int = 2) -> torch.Tensor:
    """Qwen2VLImageProcessor's flattening of one normalised [3, H, W] image -> [H/14 * W/14, 3*2*14*14]
    (the single frame repeated over the temporal patch; patches ordered by 2x2 merge group)."""
    c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.unsqueeze(0).expand(temporal, c, h, w)
    x = x.reshape(temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    return x.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(gh * gw, c * temporal * patch * patch)


def _official_pixels(image: ImageLike) -> torch.Tensor:
    """`fetch_image` (RGB, smart_resize, PIL bicubic) + the processor's rescale/normalise -> [3, h, w]."""
    img = load_rgb(image)
    h, w = smart_resize(img.height, img.width)
    img = img.resize((w, h), Image.BICUBIC)
    return TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD)


class HPSv3Model(RewardModel):
    """HPSv3 as a RewardModel; build with `load_hpsv3`. `forward` returns the official [B, 2] (μ, log σ)."""

    info = RewardInfo(
        name="hpsv3",
        version="HPSv3 (hpsv3 1.0.0, Qwen2-VL-7B)",
        higher_is_better=True,
        input_size=448,
        convention="μ of the uncertainty head, unbounded (about 5-11 for current T2I models)",
    )

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
            Qwen2VLTextModel,
        )

        self.config, self.tokenizer = config, tokenizer
        self.visual = Qwen2VisionTransformerPretrainedModel(config.vision_config)
        self.language_model = Qwen2VLTextModel(config.text_config)
        self.rm_head = nn.Sequential(  # hpsv3 `rm_head_type: ranknet` without kwargs; kept in fp32 upstream
            nn.Linear(config.text_config.hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05),
            nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2),
        )
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token_id = config.image_token_id
        self.specials = [t for t in tokenizer.get_added_vocab() if t.startswith("<|")]
        self.eval()

    def official_key(self, key: str) -> str:
        """This module's parameter name -> the official (transformers 4.45) HPSv3.safetensors name."""
        return "model." + key.removeprefix("language_model.") if key.startswith("language_model.") else key

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Qwen2VLRewardModelBT.forward: patches + grids + tokens -> [B, 2] (μ, log σ) in fp32."""
        embeds = self.language_model.embed_tokens(input_ids)
        weight = self.visual.patch_embed.proj.weight
        image = self.visual(pixel_values.to(weight.device, weight.dtype), grid_thw=grid_thw).pooler_output
        mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, batch, -1)
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                     use_cache=False).last_hidden_state
        pooled = hidden[input_ids == self.reward_token_id]  # exactly one per row (encode checks the prompts)
        return self.rm_head(pooled.to(self.rm_head[0].weight.dtype)).float()

    def _check_prompts(self, count: int, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str) or len(prompts) != count:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise PrefalignError(f"HPSv3: {count} images but {got}; pass one prompt per image")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise PrefalignError(f"HPSv3: prompt {i} is a {type(prompt).__name__}; prompts must be strings")
            special = next((t for t in self.specials if t in prompt), None)
            if special is not None:
                raise PrefalignError(f"HPSv3: prompt {i} contains the special token {special}; remove it")
        return list(prompts)

    def encode(self, prompts: Sequence[str], image_tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's tokens: chat text with `<|image_pad|>` repeated per merged image token, right padded
        with the tokenizer's pad id -> input_ids, attention_mask [B, L]."""
        rows = self.tokenizer([chat_text(p) for p in prompts])["input_ids"]
        rows = [r[:r.index(self.image_token_id)] + [self.image_token_id] * n + r[r.index(self.image_token_id) + 1:]
                for r, n in zip(rows, image_tokens, strict=True)]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        device = self.rm_head[0].weight.device
        return ids.to(device), mask.to(device)

    def model_inputs(self, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Normalised [3, h, w] images (28-multiples) + prompts -> `forward`'s (patches, grid_thw, input_ids,
        attention_mask)."""
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        patches = [patchify(x, vision.patch_size, vision.temporal_patch_size, merge) for x in images]
        grid = torch.tensor([[1, x.shape[1] // vision.patch_size, x.shape[2] // vision.patch_size] for x in images],
                            device=self.rm_head[0].weight.device)
        ids, mask = self.encode(prompts, [len(p) // merge**2 for p in patches])
        return torch.cat(patches), grid, ids, mask

    def _reward(self, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
        """Normalised [3, h, w] images (28-multiples) + prompts -> [B, 2]."""
        return self(*self.model_inputs(images, prompts))

    @torch.no_grad()
    def score(self, images: Sequence[ImageLike], prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Batched `HPSv3RewardInferencer.reward(images, prompts)[:, 0]` with the official PIL preprocessing ->
        float32 [B] on CPU."""
        prompts = self._check_prompts(len(images), prompts)
        out = [self._reward([_official_pixels(im) for im in images[i:i + batch_size]],
                            prompts[i:i + batch_size])[:, 0].cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def differentiable(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> μ [B] with gradients to the pixels: the official tensor branch of
        `fetch_image` (torchvision bicubic, antialias) to the smart_resize size, then normalise and patch."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise PrefalignError(f"HPSv3.differentiable: expected a float [B, 3, H, W] tensor in [0, 1], got "
                                 f"{images.dtype} {tuple(images.shape)}")
        prompts = self._check_prompts(images.shape[0], prompts)
        size = list(smart_resize(images.shape[2], images.shape[3]))
        x = TF.resize(images, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = TF.normalize(x, CLIP_MEAN, CLIP_STD)
        return self._reward(list(x), prompts)[:, 0]


def _files(checkpoint: str | Path | None, base: str | Path | None) -> tuple[Path, Path]:
    """(HPSv3.safetensors, directory with the Qwen2-VL config and tokenizer): each one line when missing."""
    if checkpoint is None:
        raise PrefalignError(f"hpsv3 needs a local checkpoint: a directory with {WEIGHTS_FILE} (from {_SOURCE}) and "
                             "Qwen/Qwen2-VL-7B-Instruct's config.json and tokenizer files; set it with "
                             "--checkpoint hpsv3=DIR")
    path = Path(checkpoint).expanduser()
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    require_file(weights, "HPSv3 checkpoint", f"{_SOURCE} ({WEIGHTS_FILE})", "--checkpoint hpsv3=PATH")
    base_dir = Path(base).expanduser() if base is not None else weights.parent
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        require_file(base_dir / name, f"HPSv3 base model {name}", _BASE_SOURCE, "--option hpsv3.base=DIR")
    return weights, base_dir


def load_hpsv3(checkpoint: str | Path | None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, **options: Any) -> HPSv3Model:
    """HPSv3 (Qwen2-VL-7B reward model): a directory holding HPSv3.safetensors (Hub MizzenAI/HPSv3) and the
    config.json + tokenizer files of Qwen/Qwen2-VL-7B-Instruct (--checkpoint hpsv3=DIR).

    The checkpoint may also be the .safetensors file itself; option `base` names the Qwen2-VL directory when it
    is elsewhere. Loaded strictly (only lm_head.weight is unused); the head stays fp32 whatever `dtype`.
    """
    unknown = sorted(set(options) - {"base"})
    if unknown:
        raise PrefalignError(f"hpsv3: unknown option(s) {unknown}; known: base")
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, Qwen2VLConfig

    weights, base = _files(checkpoint, options.get("base"))
    state = load_weights(weights, "HPSv3 checkpoint", _SOURCE, "--checkpoint hpsv3=PATH")
    config = Qwen2VLConfig.from_pretrained(str(base), local_files_only=True, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # as create_model_and_processor
    rows = state.get("model.embed_tokens.weight", torch.empty(0)).shape[0]
    if rows != len(tokenizer):
        raise PrefalignError(f"HPSv3 checkpoint {weights} has {rows} token embeddings but the tokenizer in {base} "
                             f"has {len(tokenizer)} ids with {REWARD_TOKEN}; is it the HPSv3 file and the "
                             "Qwen2-VL-7B-Instruct tokenizer?")
    config.text_config.vocab_size = rows  # the official model resized its embeddings to len(tokenizer)
    with init_empty_weights(include_buffers=False):  # parameters come from the file; rotary buffers are built
        model = HPSv3Model(config, tokenizer)
    ours = {model.official_key(k): k for k in model.state_dict()}
    load_strict(model, {ours.get(k, k): v for k, v in state.items()}, f"HPSv3 checkpoint {weights}",
                ignore=UNUSED_OFFICIAL_KEYS.__contains__, assign=True)
    model.to(device=device, dtype=dtype)
    model.rm_head.float()
    return model
