"""Trainable preference scorers (the models `prefalign train-reward` trains; `step_aware.py` loads them as rewards).

A scorer maps (images [B, 3, H, W] in [0, 1], prompts, optional timesteps t [B]) to preference logits [B],
with torch-only preprocessing so gradients reach the pixels. Two kinds over three backbones:

- kind "clip": `exp(logit_scale) * cos(image, text)` of a CLIP dual encoder, the PickScore / HPS convention
  (PickScore `trainer/models/clip_model.py`, HPS v2 `open_clip`); everything can train.
- kind "head": an MLP in the layout of the LAION aesthetic predictor (`aesthetic.py::AestheticHead`) on the
  frozen backbone's L2-normalised image embedding; `with_text=True` appends image * text (elementwise), the
  image-text interaction an activation-free head needs to see the prompt at all.

Backbones reuse the reward adapters' loaders: "shapes-clip" (`shapes/rewards.py`, default the shipped
checkpoint), "open_clip:ARCH" (`rewards/hps.py`; HPS-like, e.g. open_clip:ViT-H-14 with an HPS checkpoint) and
"hf-clip" (`rewards/pickscore.py`; a transformers CLIPModel directory, PickScore-like, plus its processor).
`time_conditioned=True` adds SPO's step-aware adaLN modulation (`time_conditioning.py`); at initialisation the
scorer equals the clean one exactly, and a clean scorer ignores t (the "no time conditioning" ablation).

A scorer directory holds config.json (format, kind, backbone, backbone config, meta) and model.safetensors
(the whole scorer, LoRA merged), plus processor/ for hf-clip; `load_scorer` needs no base checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from prefalign.errors import PrefalignError
from prefalign.io import atomic_save, atomic_write_text
from prefalign.rewards import registry
from prefalign.rewards.aesthetic import AestheticHead
from prefalign.rewards.base import RewardInfo
from prefalign.rewards.clip_common import (
    ClipLikeReward,
    as_bool,
    build_open_clip,
    load_strict,
    load_weights,
    open_clip_image_size,
    open_clip_tokenizer,
    read_json,
    resolve_checkpoint,
)
from prefalign.rewards.time_conditioning import (
    TimeState,
    TimestepEmbedder,
    condition_conv_tower,
    condition_hf_clip,
    condition_open_clip,
    set_block_checkpointing,
)

KINDS = ("clip", "head")
TRAIN_MODES = ("full", "lora", "frozen")
FORMAT = "prefalign-scorer"
CONFIG_FILE, WEIGHTS_FILE, PROCESSOR_DIR = "config.json", "model.safetensors", "processor"
SPEC_FIELDS = ("kind", "backbone", "time_conditioned", "backbone_config", "head")
WRITTEN_BY = "`prefalign train-reward`"
# peft LoRA targets: attention/MLP linears that the towers call as modules. open_clip's attention and the
# shapes-clip text layers are nn.MultiheadAttention / nn.TransformerEncoderLayer, whose forward (and fast
# path) read the weights directly, so a LoRA wrapper there would be silently skipped.
LORA_TARGETS = {
    "hf-clip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "open_clip": ("c_fc", "c_proj"),
    "shapes-clip": ("image_proj", "text_proj"),  # + every image-tower conv, listed per model
}


def backbone_family(backbone: str) -> str:
    """"shapes-clip", "open_clip" or "hf-clip" for a backbone spec; a one-line error otherwise."""
    if backbone in ("shapes-clip", "hf-clip"):
        return backbone
    if backbone.startswith("open_clip:") and backbone != "open_clip:":
        return "open_clip"
    raise PrefalignError(
        f"unknown scorer backbone '{backbone}'; use shapes-clip, open_clip:ARCH (e.g. open_clip:ViT-H-14) "
        "or hf-clip"
    )


def _backbone_info(backbone: str, input_size: int | None) -> RewardInfo:
    return RewardInfo(backbone, "scorer backbone", True, input_size, "cosine")


# ------------------------------------------------------------------------------------------------ backbones
def _load_backbone(
    backbone: str, checkpoint: str | Path | None, options: dict
) -> tuple[ClipLikeReward, dict, Path | None]:
    """(backbone reward with the base weights, its config for config.json, hf-clip processor dir)."""
    family = backbone_family(backbone)
    if family == "shapes-clip":  # a registered reward of the shapes world, reached by name
        reward = registry.load("shapes-clip", checkpoint)
        return reward, {"config": asdict(reward.model.config)}, None
    if family == "open_clip":
        from prefalign.rewards.hps import HPS_FILES, HPS_REPO, load_open_clip_weights

        arch = backbone.split(":", 1)[1]
        path = resolve_checkpoint(
            checkpoint, HPS_REPO, HPS_FILES["v2.1"], f"{backbone} weights", "checkpoint=PATH (a state dict)"
        )
        model, cfg = build_open_clip(arch, options.pop("model_config", None))
        load_open_clip_weights(model, path, f"{backbone} weights", "an open_clip / HPS checkpoint")
        config = {
            "model_cfg": cfg,
            "pipeline": options.pop("pipeline", "letterbox"),
            "antialias": as_bool(options.pop("antialias", True)),
        }
        return _open_clip_backbone(model, cfg, config, backbone), config, None
    from prefalign.rewards.pickscore import PICKSCORE_PROCESSOR_REPO, PICKSCORE_REPO, load_hf_clip_reward

    model_dir = resolve_checkpoint(checkpoint, PICKSCORE_REPO, None, "CLIP model directory", "checkpoint=DIR")
    processor = options.pop("processor", None)
    processor_dir = resolve_checkpoint(
        processor, PICKSCORE_PROCESSOR_REPO, None, "CLIP processor directory", "processor=DIR"
    )
    info = _backbone_info(backbone, None)
    reward = load_hf_clip_reward(
        model_dir, processor_dir, info, "cpu", torch.float32, scale=None, clip_at_zero=False
    )
    return reward, {"clip_config": reward.model.config.to_dict()}, processor_dir


def _open_clip_backbone(model: nn.Module, cfg: dict, config: dict, backbone: str) -> ClipLikeReward:
    from prefalign.rewards.hps import OpenClipReward

    if config["pipeline"] not in ("letterbox", "center_crop"):
        raise PrefalignError(
            f"scorer option pipeline='{config['pipeline']}' is unknown; use letterbox or center_crop"
        )
    size = open_clip_image_size(cfg)
    return OpenClipReward(
        model, open_clip_tokenizer(cfg), _backbone_info(backbone, size), pipeline=config["pipeline"],
        image_size=size, antialias=config["antialias"],
    )


def _empty_backbone(spec: dict, folder: Path) -> tuple[ClipLikeReward, Path | None]:
    """The backbone of a saved scorer with random weights (load_scorer then loads the whole state)."""
    family, config = backbone_family(spec["backbone"]), spec["backbone_config"]
    if family == "shapes-clip":
        reward = registry.load("shapes-clip", config=config["config"])
        reward.info = _backbone_info("shapes-clip", reward.model.config.image_size)
        return reward, None
    if family == "open_clip":
        # config.json carries the open_clip model config under "model_cfg": a layout build_open_clip reads
        model, cfg = build_open_clip(spec["backbone"].split(":", 1)[1], folder / CONFIG_FILE)
        return _open_clip_backbone(model, cfg, config, spec["backbone"]), None
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from prefalign.rewards.pickscore import HFClipReward, read_image_processor_cfg

    processor_dir = folder / PROCESSOR_DIR
    image_cfg = read_image_processor_cfg(processor_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(processor_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise PrefalignError(f"no CLIP tokenizer in {processor_dir}: {type(err).__name__}") from None
    model = CLIPModel(CLIPConfig.from_dict(config["clip_config"])).eval()
    info = _backbone_info("hf-clip", image_cfg["crop"])
    return HFClipReward(model, tokenizer, info, image_cfg=image_cfg, scale=None), processor_dir


# ---------------------------------------------------------------------------------------------------- scorer
class PreferenceScorer(nn.Module):
    """`forward(images [B,3,H,W] in [0,1], prompts, t=None) -> logits [B]`; see the module docstring.

    `spec` is the JSON-serialisable description saved in config.json (kind, backbone, time_conditioned,
    backbone_config, head). `meta` holds what `save_scorer` recorded (base model, guidance, training summary).
    """

    def __init__(self, backbone: ClipLikeReward, spec: dict, processor_dir: Path | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.family = backbone_family(spec["backbone"])
        self.processor_dir = processor_dir
        self.meta: dict = {}
        self._state = TimeState()
        self.time = TimestepEmbedder(self._add_time_conditioning()) if spec["time_conditioned"] else None
        if spec["kind"] == "head":
            width = self._embed_dim() * (2 if spec["head"]["with_text"] else 1)
            self.head = AestheticHead(width)
        else:
            self.head = None

    def _add_time_conditioning(self) -> int:
        model = self.backbone.model
        if self.family == "open_clip":
            return condition_open_clip(model.visual, self._state)
        if self.family == "hf-clip":
            return condition_hf_clip(model.vision_model, self._state)
        condition_conv_tower(model.image_tower, model.config.embed_dim, self._state)
        return model.config.embed_dim

    def _embed_dim(self) -> int:
        model = self.backbone.model
        if self.family == "open_clip":
            return int(self.spec["backbone_config"]["model_cfg"]["embed_dim"])
        if self.family == "hf-clip":
            return int(model.config.projection_dim)
        return int(model.config.embed_dim)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def uses_prompts(self) -> bool:
        return self.head is None or self.spec["head"]["with_text"]

    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], t: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise PrefalignError(f"a preference scorer needs a [B, 3, H, W] tensor in [0, 1], got {shape}")
        prompts = self.backbone._check_batch(images.shape[0], prompts)
        return self.logits_from_pixels(self.backbone.preprocess_tensor(images), prompts, t)

    def logits_from_pixels(
        self, pixels: torch.Tensor, prompts: Sequence[str], t: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Logits of preprocessed (resized, normalised) pixels: the clip or head score."""
        image = self.image_features(pixels, t)
        if self.head is None:
            cos = (image * self.text_features(prompts)).sum(-1)
            return self.backbone.model.logit_scale.exp().float() * cos  # PickScore: logit_scale.exp() * cos
        if self.spec["head"]["with_text"]:
            image = torch.cat([image, image * self.text_features(prompts)], dim=-1)
        return self.head(image.to(self.head.layers[0].weight.dtype)).squeeze(-1).float()

    def image_features(self, pixels: torch.Tensor, t: torch.Tensor | int | None = None) -> torch.Tensor:
        """L2-normalised image embeddings [B, D]; t (default 0) conditions a time-conditioned encoder."""
        pixels = pixels.to(self.backbone.device, self.backbone.dtype)
        if self.time is None:
            return F.normalize(self._encode_image(pixels).float(), dim=-1)
        t = torch.zeros(len(pixels), dtype=torch.long) if t is None else torch.as_tensor(t)
        t = t.to(pixels.device).expand(len(pixels)) if t.ndim == 0 else t.to(pixels.device)
        with self._state.use(self.time(t)):
            return F.normalize(self._encode_image(pixels).float(), dim=-1)

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        model = self.backbone.model
        if self.family == "hf-clip":
            return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        return model.encode_image(pixels)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [B, D]; each distinct prompt is encoded once."""
        backbone = self.backbone
        encode = backbone.model.encode_text if self.family == "shapes-clip" else backbone._encode_text
        return backbone._encode_unique(list(prompts), encode).float()

    # ------------------------------------------------------------------------------------ training controls
    def set_trainable(
        self,
        mode: str = "full",
        lora_rank: int | None = 8,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] | None = None,
    ) -> list[nn.Parameter]:
        """Choose what trains and return those parameters. The parts this class adds (head, timestep embedder,
        adaLN modulations) always train; the backbone trains fully ("full", PickScore), through peft LoRA
        adapters on its attention/MLP layers ("lora"; alpha defaults to the rank as in SPO) or not at all
        ("frozen", e.g. an aesthetic-style head or an adaLN-only step-aware model)."""
        if mode not in TRAIN_MODES:
            raise PrefalignError(f"scorer train mode '{mode}' is unknown; use {', '.join(TRAIN_MODES)}")
        if mode == "lora":
            self._add_lora(lora_rank, lora_alpha, lora_targets)
        for name, param in self.named_parameters():
            added = name.startswith(("time.", "head.")) or "adaLN_modulation" in name or ".lora_" in name
            param.requires_grad_(mode == "full" or added)
        params = self.trainable_parameters()
        if not params:
            raise PrefalignError(
                "nothing to train: a clean clip scorer with a frozen backbone; use mode full or lora, "
                "kind head, or time_conditioned"
            )
        return params

    def _add_lora(self, rank: int | None, alpha: float | None, targets: Sequence[str] | None) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        if not rank or int(rank) < 1:
            raise PrefalignError(f"train mode lora needs a positive lora_rank, got {rank!r}")
        if any(".lora_" in name for name, _ in self.named_parameters()):
            raise PrefalignError("this scorer already has LoRA adapters; build a fresh scorer to change them")
        if targets is None:
            targets = list(LORA_TARGETS[self.family])
            if self.family == "shapes-clip":
                tower = self.backbone.model.image_tower
                targets += [f"image_tower.{i}" for i, m in enumerate(tower) if isinstance(m, nn.Conv2d)]
        targets = list(targets)
        config = LoraConfig(
            r=int(rank), lora_alpha=float(alpha or rank), target_modules=targets, lora_dropout=0.0
        )
        try:
            inject_adapter_in_model(config, self.backbone)
        except ValueError as err:
            first = str(err).strip().splitlines()[0]
            raise PrefalignError(f"cannot add LoRA to {self.spec['backbone']} ({targets}): {first}") from None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name (for resumable training checkpoints)."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise PrefalignError(f"checkpoint has parameters this scorer lacks (e.g. {unknown[:3]})")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute ViT block activations in backward (open_clip, hf-clip). Modulated blocks checkpoint
        themselves, with their own time embedding as an argument, instead of the tower's loop."""
        if self.family == "shapes-clip":
            if enabled:
                raise PrefalignError("gradient checkpointing is for the ViT backbones (open_clip:*, hf-clip)")
            return
        model = self.backbone.model
        if self.family == "open_clip":
            model.set_grad_checkpointing(enabled)
        elif enabled:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
        if set_block_checkpointing(self, enabled) and self.family == "open_clip":
            model.visual.transformer.grad_checkpointing = False


def build_scorer(
    kind: str = "clip",
    backbone: str = "shapes-clip",
    checkpoint: str | Path | None = None,
    time_conditioned: bool = False,
    device: str | torch.device = "cpu",
    **options: Any,
) -> PreferenceScorer:
    """A scorer initialised from a base checkpoint (in eval mode; call `.train()` and `set_trainable`).

    checkpoint: shapes-clip folder (default the shipped one); open_clip state dict (.pt/.safetensors; default
    the HPS v2.1 Hub file, for ViT-H-14); hf-clip CLIPModel directory (default PickScore_v1 from the Hub).
    Options: open_clip `model_config` (JSON), `pipeline` (letterbox as HPS | center_crop), `antialias`;
    hf-clip `processor` (tokenizer + preprocessor_config.json directory); kind head `with_text`.
    Default trainable parameters: everything for kind clip, the head (and adaLN) for kind head.
    """
    if kind not in KINDS:
        raise PrefalignError(f"scorer kind '{kind}' is unknown; use one of {', '.join(KINDS)}")
    options = dict(options)
    head = {"with_text": as_bool(options.pop("with_text", False))} if kind == "head" else None
    reward, backbone_config, processor_dir = _load_backbone(backbone, checkpoint, options)
    if options:
        raise PrefalignError(f"unknown scorer option(s) {sorted(options)} for {backbone}; see build_scorer")
    spec = {
        "kind": kind, "backbone": backbone, "time_conditioned": bool(time_conditioned),
        "backbone_config": backbone_config, "head": head,
    }
    scorer = PreferenceScorer(reward, spec, processor_dir)
    scorer.set_trainable("full" if kind == "clip" else "frozen")
    return scorer.to(device).eval()


# --------------------------------------------------------------------------------------------- save / load
def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with peft LoRA folded in (W + scale * B @ A) under the plain module names."""
    state = module.state_dict()
    if not any(".base_layer." in key for key in state):
        return {k: v.detach().contiguous() for k, v in state.items()}
    from peft.tuners.lora import LoraLayer

    lora = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    deltas = {name: m.get_delta_weight(m.active_adapters[0]) for name, m in lora}
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        prefix, found, leaf = key.rpartition(".base_layer.")
        if found:
            key = f"{prefix}.{leaf}"
            value = value + deltas[prefix].to(value.dtype) if leaf == "weight" else value
        merged[key] = value.detach().contiguous()
    return merged


def save_scorer(scorer: PreferenceScorer, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write config.json + model.safetensors (+ processor/ for hf-clip) into `out_dir`; config.json last, so
    a directory with it is complete. `meta` (JSON-serialisable) keys read back by the step-aware reward:
    "base_model" (spec for prefalign.diffusion.models.load_model) and "guidance" (its CFG scale)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(scorer)
    atomic_save(out / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
    processor = out / PROCESSOR_DIR
    if scorer.family == "hf-clip" and scorer.processor_dir not in (None, processor):
        scorer.backbone.tokenizer.save_pretrained(str(processor))
        config_name = "preprocessor_config.json"
        shutil.copyfile(scorer.processor_dir / config_name, processor / config_name)
    scorer.meta = dict(meta or {})
    config = {"format": FORMAT, "format_version": 1, **scorer.spec, "meta": scorer.meta}
    if scorer.family == "open_clip":
        config["model_cfg"] = scorer.spec["backbone_config"]["model_cfg"]
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")
    return out


def load_scorer(folder: str | Path, device: str | torch.device = "cpu") -> PreferenceScorer:
    """A saved scorer in eval mode with frozen weights; `.meta` holds what save_scorer recorded."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PrefalignError(f"scorer directory not found: {folder} (train one with {WRITTEN_BY})")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise PrefalignError(f"{folder} is not a scorer directory: no {CONFIG_FILE} (see {WRITTEN_BY})")
    config = read_json(config_path, "scorer config")
    if config.get("format") != FORMAT:
        raise PrefalignError(
            f"{config_path} is not a prefalign scorer config (format {config.get('format')!r}); "
            f"point at a directory written by {WRITTEN_BY}"
        )
    missing = [k for k in SPEC_FIELDS if k not in config]
    if missing:
        raise PrefalignError(f"{config_path} lacks field(s) {missing}; rewrite it with {WRITTEN_BY}")
    spec = {k: config[k] for k in SPEC_FIELDS}
    state = load_weights(folder / WEIGHTS_FILE, "scorer weights", WRITTEN_BY)
    backbone, processor_dir = _empty_backbone(spec, folder)
    scorer = PreferenceScorer(backbone, spec, processor_dir)
    load_strict(scorer, state, f"scorer weights {folder / WEIGHTS_FILE}")
    scorer.meta = dict(config.get("meta") or {})
    return scorer.to(device).eval().requires_grad_(False)
