"""One adapter over diffusers denoisers, text encoders and VAE: SD1.x/2.x, SDXL, PixArt-α/Σ, pixel space, SD3
and FLUX.1.

Trainers and samplers see only `encode_prompts` → `Conditioning`, `forward(x_t, t, cond)` (the raw network
output in the scheduler's parameterisation), `guided` (classifier-free guidance), `predict_x0` (x̂_0 and ε̂
whatever the parameterisation), `encode_images`/`decode`, the schedule (VP or rectified flow) and the prediction
type. What differs between families lives in `prefalign.diffusion.families`, one module per family; text
encoding follows each diffusers pipeline's `encode_prompt`, so the conditioning equals what the official
pipelines feed their denoisers (checked in tests/test_models.py and tests/test_flow_models.py).
"""

from __future__ import annotations

import copy
import importlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from prefalign.diffusion.conditioning import Conditioning
from prefalign.diffusion.conversions import PREDICTION_TYPES, predicted_x0_eps
from prefalign.diffusion.families import FAMILY_REGISTRY, get_family
from prefalign.diffusion.hub import resolve_pipeline_dir
from prefalign.diffusion.schedules import (
    FlowSchedule,
    Schedule,
    same_schedule,
    schedule_from_config,
)
from prefalign.errors import PrefalignError

__all__ = ["FAMILIES", "Conditioning", "DiffusionModel", "load_model", "scheduler_settings"]

FAMILIES: tuple[str, ...] = tuple(FAMILY_REGISTRY)


def scheduler_settings(config: dict) -> tuple[Schedule, str]:
    """(schedule, prediction_type) of a diffusers scheduler config: VP (trained_betas or a named β schedule) or
    rectified flow (FlowMatchEulerDiscreteScheduler, velocity). See `schedules.schedule_from_config`."""
    return schedule_from_config(config)


_DENOISER_FAMILIES = {"PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3",
                      "FluxTransformer2DModel": "flux"}


def _infer_family(denoiser: nn.Module, n_text_encoders: int, vae: nn.Module | None) -> str:
    name = type(denoiser).__name__
    if name in _DENOISER_FAMILIES:
        return _DENOISER_FAMILIES[name]
    if name != "UNet2DConditionModel":
        raise PrefalignError(
            f"unsupported denoiser class {name}; prefalign adapts UNet2DConditionModel (SD, SDXL, pixel space), "
            f"{', '.join(_DENOISER_FAMILIES)}"
        )
    return "sdxl" if n_text_encoders == 2 else "sd" if vae is not None else "pixel"


def _default_scheduler_config(schedule: Schedule, prediction_type: str) -> dict:
    """A config that reproduces `schedule` exactly: flow's own, or VP trained_betas with DDIMScheduler defaults."""
    if isinstance(schedule, FlowSchedule):
        return schedule.diffusers_config()
    abar = schedule.alphas_cumprod
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return {
        "_class_name": "DDIMScheduler", "num_train_timesteps": schedule.num_timesteps,
        "trained_betas": betas.tolist(), "prediction_type": prediction_type,
    }


class DiffusionModel(nn.Module):
    """A text-conditioned denoiser with its text encoders, tokenizers, optional VAE and noise schedule.

    The denoiser of the module is network + schedule + parameterisation: `predict_x0` returns x̂_0 (and ε̂) for
    any of them, `guided` owns classifier-free guidance. Text encoders and VAE are frozen (requires_grad False,
    eval mode); `parameters()` of the denoiser are the trainable ones. With `vae=None` the model works in pixel
    space: x_0 = 2·image − 1.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: Schedule,
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
        strategy = get_family(self.family)
        n_text = strategy.num_text_encoders
        if len(text_encoders) != n_text or len(tokenizers) != n_text:
            raise PrefalignError(f"family '{self.family}' needs {n_text} text encoder(s) and tokenizer(s)")
        if (vae is None) == strategy.uses_vae:
            raise PrefalignError(f"family '{self.family}' {'takes no' if vae is not None else 'needs a'} VAE")
        if prediction_type not in PREDICTION_TYPES:
            raise PrefalignError(f"prediction_type '{prediction_type}' not in {', '.join(PREDICTION_TYPES)}")
        if (prediction_type == "flow_prediction") != (schedule.kind == "flow"):
            raise PrefalignError("the flow velocity parameterisation goes with a rectified-flow schedule only")
        if scheduler_config is None:
            scheduler_config = _default_scheduler_config(schedule, prediction_type)
        else:
            config_schedule, config_prediction = scheduler_settings(scheduler_config)
            if config_prediction != prediction_type or not same_schedule(config_schedule, schedule):
                raise PrefalignError("scheduler_config disagrees with the schedule/prediction_type beside it")
        self.strategy = strategy
        self.denoiser = denoiser
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        self.vae = vae
        self.schedule, self.prediction_type = schedule, prediction_type
        self.scheduler_config = dict(scheduler_config)
        self.pipeline_class = pipeline_class or strategy.pipeline_class
        # SDXL pipelines feed zeros, not the encoded "", as the unconditional embedding.
        self.force_zeros_for_empty_prompt = (
            self.family == "sdxl" if force_zeros_for_empty_prompt is None else force_zeros_for_empty_prompt
        )
        size = int(sample_size or strategy.sample_size(denoiser))
        self.vae_scale_factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        self.sample_shape: tuple[int, int, int] = (strategy.latent_channels(denoiser), size, size)
        for frozen in (self.text_encoders, vae):
            if frozen is not None:
                frozen.requires_grad_(False)
        self.train(False)

    def with_denoiser(self, denoiser: nn.Module) -> DiffusionModel:
        """A second model that shares this one's text encoders, tokenizers, VAE and schedule but runs
        `denoiser` (a frozen reference, a merged LoRA copy); neither model's modes or weights change."""
        twin = copy.copy(self)
        twin._modules = {**self._modules, "denoiser": denoiser}
        return twin

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

    def sampler_kwargs(self, sample_shape: Sequence[int] | None = None) -> dict:
        """Keyword arguments for the schedule's sampler (`generate.sample_latents`): for VP, those of
        `ddim_sample` that reproduce diffusers' `DDIMScheduler.from_config(<this scheduler config>)`
        (set_alpha_to_one, steps_offset, spacing, clipping); for flow, the pipeline's sigma grid and its shift μ
        for latents of `sample_shape` ([C, h, w]; default `self.sample_shape`)."""
        if self.schedule.kind == "flow":
            _, h, w = sample_shape or self.sample_shape
            return {"prediction_type": self.prediction_type, "spacing": self.strategy.flow_spacing,
                    "mu": self.strategy.flow_mu(self, int(h), int(w))}
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
        """Text conditioning as the family's diffusers pipeline `encode_prompt` computes it; "" is the
        unconditional (see each module of `prefalign.diffusion.families`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.strategy.encode_prompts(self, prompts)

    def _timesteps(self, t: torch.Tensor | int | float, x_t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        return t.expand(x_t.shape[0]) if t.ndim == 0 else t

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int | float, cond: Conditioning) -> torch.Tensor:
        """Raw network output (ε, v, x_0 or flow velocity per `prediction_type`), shaped like x_t; t is [B] or a
        scalar on the schedule's axis (VP: the integer timestep; flow: σ·T)."""
        return self.strategy.forward(self, x_t, self._timesteps(t, x_t), cond.to(x_t.device, x_t.dtype))

    def guided(
        self, x_t: torch.Tensor, t: torch.Tensor | int | float, cond: Conditioning, uncond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022) with one batched forward of [uncond; cond], as the
        diffusers pipelines do; scale 1 is a single conditional forward. A one-row `uncond` is broadcast.
        Guidance-distilled FLUX checkpoints take the scale as a network input instead."""
        if guidance_scale == 1 and not self.strategy.embeds_guidance(self):
            return self(x_t, t, cond)
        return self.strategy.guided(self, x_t, self._timesteps(t, x_t), cond, uncond, guidance_scale)

    def predict_x0(
        self, x_t: torch.Tensor, t: torch.Tensor | int | float, cond: Conditioning,
        uncond: Conditioning | None = None, guidance_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) from the (guided, when `uncond` is given) network output, whatever its parameterisation."""
        t = self._timesteps(t, x_t)
        out = self(x_t, t, cond) if uncond is None else self.guided(x_t, t, cond, uncond, guidance_scale)
        alpha, sigma = self.schedule.alpha_sigma(t, like=x_t)
        return predicted_x0_eps(out, x_t, alpha, sigma, self.prediction_type)

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
        text_names = ("text_encoder", *(f"text_encoder_{i}" for i in (2, 3) if f"text_encoder_{i}" in found))
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
        loadable by `from_pretrained` and, except for pixel, by the matching diffusers pipeline class. It is
        written beside the target and moved into place: an interrupted save keeps the previous directory."""
        import diffusers

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            index: dict = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__}
            named = {self.strategy.denoiser_component: self.denoiser, "vae": self.vae}
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
            index.update(self.strategy.index_extras(self))
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


# The shapes-world teacher ships inside the package; "shapes-teacher[:DIR]" names it (or a retrained one).
SHIPPED_TEACHER_DIR = Path(__file__).resolve().parents[1] / "assets" / "shapes_teacher"


def load_model(spec: str | None, device: torch.device | str = "cpu") -> DiffusionModel:
    """None or "shapes-teacher" → the shipped shapes teacher; "shapes-teacher:DIR" → that teacher; anything else
    a pipeline directory or Hub id (`DiffusionModel.from_pretrained`)."""
    if spec in (None, "", "shapes-teacher") or spec.startswith("shapes-teacher:"):
        path = Path(spec.split(":", 1)[1]) if spec and ":" in spec else SHIPPED_TEACHER_DIR
        if not (path / "model_index.json").is_file():
            hint = "run `prefalign shapes pretrain --out DIR`" if path == SHIPPED_TEACHER_DIR else "check the path"
            raise PrefalignError(f"no shapes teacher at {path} (model_index.json missing); {hint}")
        spec = str(path)
    return DiffusionModel.from_pretrained(spec, device=device)


_COMPONENTS = (
    "unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
    "tokenizer_3", "vae", "scheduler",
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
