"""Tiny random-weight pipelines of the real architectures, built fully offline (tests, CPU smoke runs).

Every family uses the real diffusers/transformers classes (UNet2DConditionModel, PixArtTransformer2DModel,
SD3Transformer2DModel, FluxTransformer2DModel, AutoencoderKL, CLIPTextModel(WithProjection), T5EncoderModel) with widths small enough for a 2-core CPU, and
the real CLIP BPE vocabulary that ships inside open_clip, so tokenisation matches the released models.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from prefalign.diffusion.models import FAMILIES, DiffusionModel, scheduler_settings
from prefalign.errors import PrefalignError
from prefalign.io import atomic_write_text

CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 byte</w> + 48894 merges + <|startoftext|> + <|endoftext|>
# DDIMScheduler as SD ships it (set_alpha_to_one=False, steps_offset=1): settings the samplers must mirror.
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
# SD3.5-Medium's scheduler (static shift 3) and FLUX.1-dev's (resolution-dependent shift).
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {
    **SD3_SCHEDULER, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
# PixArt-α and DDPM-style pixel models train on the linear 1e-4..0.02 schedule (DDPM Ho et al. 2020, §4).
LINEAR_SCHEDULER = {**SD_SCHEDULER, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}


def _cache_dir() -> Path:
    """$XDG_CACHE_HOME/prefalign (default ~/.cache/prefalign), or a temp dir when that is not writable."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefalign" / "clip-bpe"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"prefalign-clip-bpe-{os.getuid()}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def clip_bpe_files() -> tuple[Path, Path]:
    """Write (once) vocab.json + merges.txt of OpenAI CLIP's BPE from open_clip/bpe_simple_vocab_16e6.txt.gz.

    Mirrors open_clip.tokenizer.SimpleTokenizer: merges are lines 1..48894 of the file; the vocabulary is the
    256 byte symbols, the same with '</w>', one token per merge, then the two special tokens — the layout of
    openai/clip-vit-large-patch14's vocab.json.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    directory = _cache_dir()
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        return vocab_path, merges_path
    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    # Atomic writes: several test processes may build the cache at the same time.
    atomic_write_text(vocab_path, json.dumps({tok: i for i, tok in enumerate(tokens)}))
    atomic_write_text(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (ids identical to open_clip's), `model_max_length = max_length`, offline."""
    vocab_path, merges_path = clip_bpe_files()
    return CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=max_length)


def _clip_text(hidden: int, projection: bool, seed: int) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Two layers so that SDXL's penultimate hidden state differs from the last one."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(width: int, seed: int) -> T5EncoderModel:
    """A two-layer T5 encoder over the CLIP vocabulary (no T5 sentencepiece model ships offline)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=CLIP_VOCAB_SIZE,
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=49407,
        eos_token_id=49407,
    )
    return T5EncoderModel(config).eval()


def _vae(scaling_factor: float, seed: int, sample_size: int, shift_factor: float | None = None) -> AutoencoderKL:
    """Two-level KL autoencoder: 3 → 4 latent channels, downsampling ×2 (the real ones use ×8)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def _tiny_sd3(seed: int, sample_size: int) -> DiffusionModel:
    """CLIP-L-like (hidden 32, projection 16) + CLIP-G-like (48, 24) + T5 (96): context 80 → zero-padded to 96,
    pooled 16 + 24 = 40; SD3Transformer2DModel with one joint block; SD3's VAE factors 1.5305 / 0.0609."""
    torch.manual_seed(seed + 3)
    denoiser = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=16, pooled_projection_dim=40,
        pos_embed_max_size=sample_size,
    )
    return DiffusionModel(
        denoiser, *scheduler_settings(SD3_SCHEDULER),
        text_encoders=[_clip_text(32, True, seed), _clip_text(48, True, seed + 1), _t5(96, seed + 2)],
        tokenizers=[clip_tokenizer(), clip_tokenizer(), clip_tokenizer()],
        vae=_vae(1.5305, seed + 4, sample_size, shift_factor=0.0609), family="sd3",
        scheduler_config=dict(SD3_SCHEDULER),
    )


def _tiny_flux(seed: int, sample_size: int) -> DiffusionModel:
    """CLIP (hidden 32, pooled 32) + T5 (48); FluxTransformer2DModel with one double and one single block on
    2×2-packed 4-channel latents (in_channels 16), RoPE axes (4, 6, 6), guidance embedding (FLUX.1-dev style);
    FLUX's VAE factors 0.3611 / 0.1159 and its resolution-dependent shift."""
    torch.manual_seed(seed + 2)
    denoiser = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return DiffusionModel(
        denoiser, *scheduler_settings(FLUX_SCHEDULER),
        text_encoders=[_clip_text(32, False, seed), _t5(48, seed + 1)],
        tokenizers=[clip_tokenizer(), clip_tokenizer()],
        vae=_vae(0.3611, seed + 3, sample_size, shift_factor=0.1159), family="flux",
        sample_size=sample_size, scheduler_config=dict(FLUX_SCHEDULER),
    )


def _unet(in_channels: int, sample_size: int, cross_dim: int, seed: int, **extra) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        **extra,
    )


def tiny_pipeline(family: str = "sd", seed: int = 0, sample_size: int = 32) -> DiffusionModel:
    """A random-weight `DiffusionModel` of `family` whose x_t is [4 or 3, sample_size, sample_size].

    - sd: CLIPTextModel + SD1-style UNet (conv projections) + VAE (scaling 0.18215).
    - sdxl: CLIPTextModel (hidden 32) + CLIPTextModelWithProjection (hidden 48, projection 24); the UNet uses
      linear projections, cross-attention on the 80-d concatenation and addition_embed_type="text_time" with
      projection_class_embeddings_input_dim = 6·8 + 24; VAE scaling 0.13025. The two widths differ so that a
      swapped concatenation order cannot pass the parity tests.
    - pixart: T5EncoderModel + PixArtTransformer2DModel with learned sigma (out_channels = 2·4). It pairs the
      T5 encoder with the CLIP tokenizer (model_max_length 120) because no T5 sentencepiece model ships
      offline.
    - pixel: CLIP text encoder + a 3-channel pixel-space UNet, no VAE (the shapes-world teacher's layout).
    - sd3 / flux: rectified-flow transformers with their text encoders (`_tiny_sd3`, `_tiny_flux`). FLUX has no
      sample_size in its config: a reloaded one takes FluxPipeline's default (128).
    """
    if family not in FAMILIES:
        raise PrefalignError(f"unknown model family '{family}'; use one of {', '.join(FAMILIES)}")
    if family == "sd3":
        return _tiny_sd3(seed, sample_size)
    if family == "flux":
        return _tiny_flux(seed, sample_size)
    if family == "pixart":
        text_encoder = _t5(32, seed)
        torch.manual_seed(seed + 1)
        denoiser = PixArtTransformer2DModel(
            sample_size=sample_size,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            caption_channels=32,
            cross_attention_dim=16,
        )
        return DiffusionModel(
            denoiser,
            *scheduler_settings(LINEAR_SCHEDULER),
            text_encoders=[text_encoder],
            tokenizers=[clip_tokenizer(120)],
            vae=_vae(0.18215, seed + 2, sample_size),
            family="pixart",
            scheduler_config=dict(LINEAR_SCHEDULER),
        )
    if family == "sdxl":
        text_encoders = [_clip_text(32, False, seed), _clip_text(48, True, seed + 1)]
        denoiser = _unet(
            4,
            sample_size,
            32 + 48,
            seed + 2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 24,
        )
        return DiffusionModel(
            denoiser,
            *scheduler_settings(SD_SCHEDULER),
            text_encoders=text_encoders,
            tokenizers=[clip_tokenizer(), clip_tokenizer()],
            vae=_vae(0.13025, seed + 3, sample_size),
            family="sdxl",
            scheduler_config=dict(SD_SCHEDULER),
        )
    pixel = family == "pixel"
    scheduler = LINEAR_SCHEDULER if pixel else SD_SCHEDULER
    return DiffusionModel(
        _unet(3 if pixel else 4, sample_size, 32, seed + 1),
        *scheduler_settings(scheduler),
        text_encoders=[_clip_text(32, False, seed)],
        tokenizers=[clip_tokenizer()],
        vae=None if pixel else _vae(0.18215, seed + 2, sample_size),
        family=family,
        scheduler_config=dict(scheduler),
    )


def save_tiny_pipeline(
    directory: str | Path, family: str = "sd", seed: int = 0, sample_size: int = 32
) -> Path:
    """Build `tiny_pipeline(family, seed, sample_size)` and write it as a diffusers pipeline directory."""
    tiny_pipeline(family, seed, sample_size).save_pretrained(directory)
    return Path(directory)
