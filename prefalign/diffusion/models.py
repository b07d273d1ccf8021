"""One adapter over diffusers denoisers, text encoders and VAE: SD1.x/2.x, SDXL, PixArt-α/Σ, pixel space.

Trainers and samplers see only `encode_prompts` → `Conditioning`, `forward(x_t, t, cond)` (the raw network
output in the scheduler's parameterisation), `guided` (classifier-free guidance), `encode_images`/`decode`,
the `NoiseSchedule` and the prediction type. Text encoding follows each diffusers pipeline's `encode_prompt`,
so the conditioning equals what the official pipelines feed their denoisers (checked in tests/test_models.py).
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prefalign.diffusion.hub import resolve_pipeline_dir
from prefalign.diffusion.sampling import cfg_combine
from prefalign.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule
from prefalign.errors import PrefalignError

FAMILIES: tuple[str, ...] = ("sd", "sdxl", "pixart", "pixel")
PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "pixart": "PixArtAlphaPipeline",
    "pixel": "PrefalignPixelPipeline",  # no diffusers pipeline class: DiffusionModel.from_pretrained loads it
}
# PixArt pipelines' default `max_sequence_length` (the T5 context the models were trained with).
PIXART_MAX_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


@dataclass
class Conditioning:
    """Everything the denoiser needs besides x_t and t."""

    hidden_states: torch.Tensor  # [B, L, D] encoder_hidden_states
    attention_mask: torch.Tensor | None = None  # [B, L] (PixArt / T5)
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL added conds: text_embeds, time_ids

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def _map(self, fn) -> Conditioning:
        mask = None if self.attention_mask is None else fn(self.attention_mask)
        return Conditioning(fn(self.hidden_states), mask, {k: fn(v) for k, v in self.added.items()})

    def cat(self, other: Conditioning) -> Conditioning:
        """Batch concatenation [self; other] (CFG runs [uncond; cond] in one forward)."""
        same_mask = (self.attention_mask is None) == (other.attention_mask is None)
        if not same_mask or self.added.keys() != other.added.keys():
            raise PrefalignError("cannot concatenate Conditionings of different models (mask/added differ)")
        mask = None if self.attention_mask is None else torch.cat([self.attention_mask, other.attention_mask])
        added = {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()}
        return Conditioning(torch.cat([self.hidden_states, other.hidden_states]), mask, added)

    def index(self, idx: torch.Tensor | slice) -> Conditioning:
        """Select rows (a slice, an index tensor or a boolean mask)."""
        return self._map(lambda x: x[idx])

    def repeat_interleave(self, n: int) -> Conditioning:
        """Repeat each row n times, e.g. one prompt per group of n samples."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to `device`; `dtype` casts floating tensors only (the attention mask keeps its int type)."""
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))


def scheduler_settings(config: dict) -> tuple[NoiseSchedule, str]:
    """(NoiseSchedule, prediction_type) of a diffusers scheduler config (trained_betas or a named β schedule).

    Zero-terminal-SNR rescaling (Lin et al. 2024) is refused rather than silently ignored.
    """
    if config.get("rescale_betas_zero_snr"):
        raise PrefalignError(
            "scheduler_config.json sets rescale_betas_zero_snr, which prefalign's NoiseSchedule does not "
            "support; use a model trained without zero terminal SNR"
        )
    if config.get("trained_betas") is not None:
        schedule = NoiseSchedule.from_betas(torch.tensor(config["trained_betas"], dtype=torch.float64))
    else:
        schedule = NoiseSchedule.from_diffusers_config(config)
    prediction_type = config.get("prediction_type") or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        known = ", ".join(PREDICTION_TYPES)
        raise PrefalignError(f"scheduler_config.json: prediction_type '{prediction_type}' is not in {known}")
    return schedule, prediction_type


def _infer_family(denoiser: nn.Module, n_text_encoders: int, vae: nn.Module | None) -> str:
    if type(denoiser).__name__ == "PixArtTransformer2DModel":
        return "pixart"
    if type(denoiser).__name__ != "UNet2DConditionModel":
        raise PrefalignError(
            f"unsupported denoiser class {type(denoiser).__name__}; prefalign adapts UNet2DConditionModel "
            "(SD, SDXL, pixel space) and PixArtTransformer2DModel"
        )
    return "sdxl" if n_text_encoders == 2 else "sd" if vae is not None else "pixel"


class DiffusionModel(nn.Module):
    """A text-conditioned denoiser with its text encoders, tokenizers, optional VAE and noise schedule.

    Text encoders and VAE are frozen (requires_grad False, eval mode); `parameters()` of the denoiser are the
    trainable ones. With `vae=None` the model works in pixel space: x_0 = 2·image − 1.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence,
        vae: nn.Module | None = None,
        family: str | None = None,
        sample_size: int | None = None,
        scheduler_config: dict | None = None,
        pipeline_class: str | None = None,
        force_zeros_for_empty_prompt: bool | None = None,
    ) -> None:
        super().__init__()
        self.family = family or _infer_family(denoiser, len(text_encoders), vae)
        if self.family not in FAMILIES:
            raise PrefalignError(f"unknown model family '{self.family}'; use one of {', '.join(FAMILIES)}")
        n_text = 2 if self.family == "sdxl" else 1
        if len(text_encoders) != n_text or len(tokenizers) != n_text:
            raise PrefalignError(f"family '{self.family}' needs {n_text} text encoder(s) and tokenizer(s)")
        if (vae is None) != (self.family == "pixel"):
            raise PrefalignError(f"family '{self.family}' {'takes no' if vae is not None else 'needs a'} VAE")
        if prediction_type not in PREDICTION_TYPES:
            raise PrefalignError(f"prediction_type '{prediction_type}' not in {', '.join(PREDICTION_TYPES)}")
        if scheduler_config is None:
            # trained_betas reproduce any schedule exactly; other keys keep diffusers' DDIMScheduler defaults.
            abar = schedule.alphas_cumprod
            betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
            scheduler_config = {
                "_class_name": "DDIMScheduler", "num_train_timesteps": schedule.num_timesteps,
                "trained_betas": betas.tolist(), "prediction_type": prediction_type,
            }
        else:
            config_schedule, config_prediction = scheduler_settings(scheduler_config)
            if config_prediction != prediction_type or not torch.allclose(
                config_schedule.alphas_cumprod, schedule.alphas_cumprod
            ):
                raise PrefalignError("scheduler_config disagrees with the schedule/prediction_type beside it")
        self.denoiser = denoiser
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        self.vae = vae
        self.schedule, self.prediction_type = schedule, prediction_type
        self.scheduler_config = dict(scheduler_config)
        self.pipeline_class = pipeline_class or PIPELINE_CLASSES[self.family]
        # SDXL pipelines feed zeros, not the encoded "", as the unconditional embedding.
        self.force_zeros_for_empty_prompt = (
            self.family == "sdxl" if force_zeros_for_empty_prompt is None else force_zeros_for_empty_prompt
        )
        config_size = denoiser.config.sample_size
        size = sample_size or (config_size if isinstance(config_size, int) else config_size[0])
        self.vae_scale_factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        self.sample_shape: tuple[int, int, int] = (denoiser.config.in_channels, int(size), int(size))
        for frozen in (self.text_encoders, vae):
            if frozen is not None:
                frozen.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> DiffusionModel:
        """Only the denoiser switches mode; frozen text encoders and VAE stay in eval mode."""
        self.training = mode
        self.denoiser.train(mode)
        self.text_encoders.eval()
        if self.vae is not None:
            self.vae.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of decoded images at the default resolution."""
        return self.sample_shape[1] * self.vae_scale_factor, self.sample_shape[2] * self.vae_scale_factor

    def sampler_kwargs(self) -> dict:
        """Keyword arguments for `prefalign.diffusion.sampling.ddim_sample` that reproduce diffusers'
        `DDIMScheduler.from_config(<this scheduler config>)` (set_alpha_to_one, steps_offset, spacing)."""
        from diffusers import DDIMScheduler

        cfg = DDIMScheduler.from_config(self.scheduler_config).config
        final = 1.0 if cfg.set_alpha_to_one else float(self.schedule.alphas_cumprod[0])
        return {
            "prediction_type": self.prediction_type, "spacing": cfg.timestep_spacing,
            "steps_offset": cfg.steps_offset, "final_alpha_cumprod": final,
            "clip_sample": cfg.clip_sample_range if cfg.clip_sample else None,
        }

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text conditioning as the diffusers pipelines' `encode_prompt` computes it; "" is the unconditional.

        SD (StableDiffusionPipeline.encode_prompt): CLIP last hidden state, padded to the tokenizer's max.
        SDXL (StableDiffusionXLPipeline.encode_prompt + _get_add_time_ids): penultimate hidden states of both
        encoders concatenated, pooled `text_embeds` of text_encoder_2, time_ids = (H, W, 0, 0, H, W) at the
        default image size; "" gives zeros when force_zeros_for_empty_prompt (the pipeline's negative).
        PixArt (PixArtAlphaPipeline.encode_prompt): T5 last hidden state and its attention mask, padded to
        the pipeline's max_sequence_length (120; 300 for PixArt-Σ), not the tokenizer's model_max_length.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = next(self.text_encoders[0].parameters()).device
        if self.family == "pixart":
            max_length = PIXART_MAX_LENGTH.get(self.pipeline_class, 120)
            tokens = self.tokenizers[0](
                prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            )
            mask = tokens.attention_mask.to(device)
            hidden = self.text_encoders[0](tokens.input_ids.to(device), attention_mask=mask)[0]
            return Conditioning(hidden, mask)
        embeds, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            tokens = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            )
            ids = tokens.input_ids.to(device)
            if self.family == "sdxl":
                out = encoder(ids, output_hidden_states=True)
                embeds.append(out.hidden_states[-2])
                pooled = getattr(out, "text_embeds", pooled)
            else:
                use_mask = getattr(encoder.config, "use_attention_mask", False)
                mask = tokens.attention_mask.to(device) if use_mask else None
                embeds.append(encoder(ids, attention_mask=mask)[0])
        hidden = torch.cat(embeds, dim=-1)
        if self.family != "sdxl":
            return Conditioning(hidden)
        if pooled is None:
            raise PrefalignError("SDXL text_encoder_2 must be a CLIPTextModelWithProjection (text_embeds)")
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=device)[:, None, None]
            hidden = hidden.masked_fill(empty, 0.0)
            pooled = pooled.masked_fill(empty[:, :, 0], 0.0)
        h, w = self.image_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden.dtype, device=device)
        time_ids = time_ids.expand(len(hidden), -1)
        return Conditioning(hidden, None, {"text_embeds": pooled, "time_ids": time_ids})

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int | float, cond: Conditioning) -> torch.Tensor:
        """Raw network output (ε, v or x_0 per `prediction_type`), shaped like x_t; t is [B] or a scalar."""
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        cond = cond.to(x_t.device, x_t.dtype)
        if self.family != "pixart":
            return self.denoiser(
                x_t, t, encoder_hidden_states=cond.hidden_states, added_cond_kwargs=cond.added or None,
                return_dict=False,
            )[0]
        added = {"resolution": None, "aspect_ratio": None}
        if self.denoiser.use_additional_conditions:
            # PixArt-α 1024px micro-conditions: image (H, W) and H/W, as PixArtAlphaPipeline passes them.
            h, w = x_t.shape[-2] * self.vae_scale_factor, x_t.shape[-1] * self.vae_scale_factor
            added = {
                "resolution": x_t.new_tensor([[h, w]]).expand(x_t.shape[0], 2),
                "aspect_ratio": x_t.new_tensor([[h / w]]).expand(x_t.shape[0], 1),
            }
        out = self.denoiser(
            x_t, encoder_hidden_states=cond.hidden_states, encoder_attention_mask=cond.attention_mask,
            timestep=t, added_cond_kwargs=added, return_dict=False,
        )[0]
        return out[:, : x_t.shape[1]]  # learned-sigma models output [ε; variance]: keep ε

    def guided(
        self, x_t: torch.Tensor, t: torch.Tensor | int | float, cond: Conditioning, uncond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022) with one batched forward of [uncond; cond], as the
        diffusers pipelines do; scale 1 is a single conditional forward. A one-row `uncond` is broadcast."""
        if guidance_scale == 1:
            return self(x_t, t, cond)
        if len(uncond) == 1 and len(cond) > 1:
            uncond = uncond.repeat_interleave(len(cond))
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        out_uncond, out_cond = self(torch.cat([x_t, x_t]), torch.cat([t, t]), uncond.cat(cond)).chunk(2)
        return cfg_combine(out_cond, out_uncond, guidance_scale)

    def encode_images(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] → x_0 = (z − shift_factor)·scaling_factor, z ~ the VAE posterior
        (a sample, as the diffusers and Diffusion-DPO training scripts draw it; `sample=False` takes the
        mode), or 2·image − 1 in pixel space."""
        pixels = images * 2 - 1
        if self.vae is None:
            return pixels.to(self.dtype)
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        shift = self.vae.config.shift_factor or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x_0 → images in [0, 1] (clamped), differentiable; the inverse of `encode_images`."""
        if self.vae is not None:
            z = x0.to(self.vae.dtype) / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
            x0 = self.vae.decode(z, return_dict=False)[0]
        return (x0.float() / 2 + 0.5).clamp(0, 1)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> DiffusionModel:
        """Load a diffusers pipeline directory (or Hub id) component by component, without the pipeline class
        (so pixel-space directories without a VAE load too)."""
        root = resolve_pipeline_dir(path_or_hub_id)
        index_path = root / "model_index.json"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PrefalignError(f"{index_path}: unreadable ({e}); re-save the pipeline") from None
        found = {n: _load_component(root, n, index, dtype) for n in _COMPONENTS if _listed(index, n)}
        denoiser_name = "unet" if "unet" in found else "transformer"
        text_names = ("text_encoder", "text_encoder_2") if "text_encoder_2" in found else ("text_encoder",)
        tokenizer_names = tuple(n.replace("text_encoder", "tokenizer") for n in text_names)
        for name in (denoiser_name, *text_names, *tokenizer_names, "scheduler"):
            if name not in found:
                raise PrefalignError(f"{index_path}: missing component '{name}' (subfolder {name}/)")
        vae = found.get("vae")
        if vae is not None and dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae = vae.to(torch.float32)  # fp16 SD/SDXL VAEs overflow; diffusers pipelines upcast them too
        model = cls(
            found[denoiser_name], *scheduler_settings(found["scheduler"]),
            text_encoders=[found[n] for n in text_names], tokenizers=[found[n] for n in tokenizer_names],
            vae=vae, scheduler_config=found["scheduler"], pipeline_class=index.get("_class_name"),
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
        )
        return model.to(device)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a diffusers-layout pipeline directory (model_index.json + one subfolder per component),
        loadable by `from_pretrained` and, for sd/sdxl/pixart, by the matching diffusers pipeline class. It is
        written beside the target and moved into place: an interrupted save keeps the previous directory."""
        import diffusers

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            index: dict = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__}
            named = {"unet" if self.family != "pixart" else "transformer": self.denoiser, "vae": self.vae}
            for i, (encoder, tokenizer) in enumerate(zip(self.text_encoders, self.tokenizers, strict=True)):
                suffix = f"_{i + 1}" if i else ""
                named[f"text_encoder{suffix}"], named[f"tokenizer{suffix}"] = encoder, tokenizer
            for name, component in named.items():
                if component is not None:
                    component.save_pretrained(tmp / name)
                    index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
            scheduler = {"_class_name": "DDIMScheduler", **self.scheduler_config}
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
            index["scheduler"] = ["diffusers", scheduler["_class_name"]]
            if self.family == "sd":
                index.update(safety_checker=[None, None], feature_extractor=[None, None])
                index["requires_safety_checker"] = False
            if self.family == "sdxl":
                index["force_zeros_for_empty_prompt"] = self.force_zeros_for_empty_prompt
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            old = directory.with_name(f".{directory.name}.old") if directory.exists() else None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
            tmp.chmod(0o755)  # mkdtemp makes 0700 directories
            tmp.rename(directory)
            if old is not None:
                shutil.rmtree(old)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


_COMPONENTS = (
    "unet", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler",
)


def _listed(index: dict, name: str) -> bool:
    """diffusers writes absent optional components as [null, null]."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _load_component(root: Path, name: str, index: dict, dtype: torch.dtype):
    """Load one component with the diffusers/transformers class that model_index.json names (weights through
    safetensors or weights_only torch.load, as those libraries do); the scheduler comes back as its config."""
    folder = root / name
    if not folder.is_dir():
        raise PrefalignError(f"{root}: model_index.json lists '{name}' but subfolder {folder} is missing")
    if name == "scheduler":
        config_path = folder / "scheduler_config.json"
        if not config_path.is_file():
            raise PrefalignError(f"{config_path} is missing; copy it from the original pipeline")
        return json.loads(config_path.read_text())
    library, class_name = index[name]
    known = library in ("diffusers", "transformers")
    klass = getattr(importlib.import_module(library), class_name, None) if known else None
    if klass is None:
        raise PrefalignError(f"{root}/model_index.json: '{name}' names unknown class {library}.{class_name}")
    # transformers ≥4.56 takes `dtype` (torch_dtype is deprecated there); diffusers still takes torch_dtype.
    dtype_key = "torch_dtype" if library == "diffusers" else "dtype"
    kwargs = {} if name.startswith("tokenizer") else {dtype_key: dtype}
    try:
        return klass.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrefalignError(f"cannot load {folder}: {first}") from None
