"""The trainable diffusion policy and its frozen reference, shared by the alignment trainers.

Full fine-tuning or LoRA (peft: diffusers' `add_adapter` where the denoiser class has it, otherwise peft's
`inject_adapter_in_model`, e.g. PixArtTransformer2DModel in diffusers 0.42, or any other nn.Module); the reference
is either a frozen deep copy or the same network with its adapters disabled (no second copy in memory, the usual
choice for LoRA on SDXL), or none for networks trained without one (Diff-Instruct++'s teaching assistant).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from prefalign.diffusion.models import Conditioning, DiffusionModel
from prefalign.diffusion.models import load_model as load_base_model
from prefalign.errors import PrefalignError
from prefalign.train import distributed
from prefalign.train.common import ema_weights

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
__all__ = ["DEFAULT_LORA_TARGETS", "Policy", "evaluation_weights", "load_base_model"]


def add_lora(denoiser: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """LoRA (B = 0, A Gaussian: the adapted network starts equal to the base) on the `targets` of `denoiser`,
    under adapter name "default" on either path, so trainable-state checkpoints have the same parameter names."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    try:
        if hasattr(denoiser, "add_adapter"):  # diffusers' PeftAdapterMixin: also keeps its peft_config bookkeeping
            denoiser.add_adapter(config)
        else:
            inject_adapter_in_model(config, denoiser)
    except ValueError as e:  # e.g. peft's "Target modules ... not found in the base model"
        raise PrefalignError(f"cannot add LoRA on policy.lora_targets {list(targets)} to {type(denoiser).__name__}: "
                             f"{str(e).strip().splitlines()[0][:200]}") from None


def _lora_layers(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in denoiser.named_modules() if isinstance(m, BaseTunerLayer)]


def set_lora_enabled(denoiser: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer on or off (off: the base network's output), as diffusers' `enable_adapters` /
    `disable_adapters` do, for denoisers with or without them; peft keeps the adapters' requires_grad in step."""
    for _, layer in _lora_layers(denoiser):
        layer.enable_adapters(enabled)


def merge_lora(denoiser: torch.nn.Module) -> None:
    """Fold LoRA into the base weights (W + α/r·BA) and put the plain base layers back in place, in place: the
    state dict then has the base model's keys, so `save_pretrained` writes a directory the base class loads."""
    for name, layer in _lora_layers(denoiser):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(denoiser.get_submodule(parent_name), child, layer.get_base_layer())
    if getattr(denoiser, "_hf_peft_config_loaded", False):  # diffusers' adapter bookkeeping: none are left
        del denoiser.peft_config
        denoiser._hf_peft_config_loaded = False


class Policy:
    """A `DiffusionModel` whose denoiser trains (fully or through LoRA) next to a frozen reference of itself."""

    def __init__(
        self,
        model: DiffusionModel,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        reference: str = "copy",
    ) -> None:
        if reference not in ("copy", "adapter", "none"):
            raise PrefalignError(f"policy.reference '{reference}' unknown; use copy, adapter or none")
        if reference == "adapter" and not lora_rank:
            raise PrefalignError("policy.reference=adapter needs LoRA (policy.lora_rank > 0); use reference=copy")
        self.model, self.lora_rank, self.reference_mode = model, lora_rank, reference
        model.denoiser.float()  # master weights in fp32; autocast handles mixed precision
        # The reference is a second denoiser sharing the text encoders and VAE: a frozen copy, or (adapter) the
        # same network, run with its LoRA adapters disabled.
        self.reference_model: DiffusionModel | None = None
        if reference == "copy":
            self.reference_model = model.with_denoiser(copy.deepcopy(model.denoiser).requires_grad_(False).eval())
        if lora_rank:
            model.denoiser.requires_grad_(False)
            add_lora(model.denoiser, int(lora_rank), float(lora_alpha or lora_rank), lora_targets)
        else:
            model.denoiser.requires_grad_(True)
        self._unwrapped = model.denoiser
        self._skeleton: torch.nn.Module | None = None  # the plain denoiser's structure once sharded
        if reference == "adapter":
            self.reference_model = model.with_denoiser(self._unwrapped)

    def shard(self) -> None:
        """FSDP (`train.distributed=fsdp`): shard the denoiser and a copied reference over the processes; call it
        before `trainable_parameters`, whose shards the optimizer then holds. LoRA adapters switch off on the
        shards as on whole layers (FSDP2 takes requires_grad from the shard at each gather)."""
        self._skeleton = distributed.skeleton(self._unwrapped)
        distributed.shard(self._unwrapped)
        if self.reference_model is not None and self.reference_model.denoiser is not self._unwrapped:
            distributed.shard(self.reference_model.denoiser)

    @property
    def sharded(self) -> bool:
        return self._skeleton is not None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self._unwrapped.parameters() if p.requires_grad]

    def prepare(self, accelerator, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Wrap the denoiser (DDP; a sharded one stays as it is) and the optimizer; returns the optimizer."""
        if self.sharded:
            return accelerator.prepare(optimizer)
        self.model.denoiser, optimizer = accelerator.prepare(self._unwrapped, optimizer)
        return optimizer

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return distributed.optimizer_state(self._unwrapped, optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        distributed.load_optimizer_state(self._unwrapped, optimizer, state)

    @contextlib.contextmanager
    def _reference(self) -> Iterator[DiffusionModel]:
        if self.reference_model is None:
            raise PrefalignError("this policy was built with reference=none; use policy.reference=copy or adapter")
        if self.reference_mode == "adapter":
            set_lora_enabled(self._unwrapped, False)
        try:
            yield self.reference_model
        finally:
            if self.reference_mode == "adapter":
                set_lora_enabled(self._unwrapped, True)

    @torch.no_grad()
    def reference(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Conditioning) -> torch.Tensor:
        """Reference network output, without gradients."""
        with self._reference() as reference:
            return reference(x_t, t, cond)

    @torch.no_grad()
    def reference_guided(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Conditioning, uncond: Conditioning,
                         guidance_scale: float) -> torch.Tensor:
        """Classifier-free guided reference output (`DiffusionModel.guided` of the reference), without gradients."""
        with self._reference() as reference:
            return reference.guided(x_t, t, cond, uncond, guidance_scale)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters by name, whole (gathered when sharded: every process calls it), on the CPU."""
        names = {id(p): n for n, p in self._unwrapped.named_parameters()}
        return {names[id(p)]: distributed.full(p.detach()).cpu().clone() for p in self.trainable_parameters()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self._unwrapped.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise PrefalignError(f"checkpoint has parameters this policy lacks ({missing[0]}, ...): "
                                 "was it trained with another policy.lora_rank or base model?")
        for name, value in state.items():
            params[name].copy_(distributed.like(value, params[name]))

    def merged_denoiser(self) -> torch.nn.Module | None:
        """A standalone copy of the current denoiser with LoRA folded into the base weights. Sharded: gathered on
        the main process (None elsewhere); every process must call it."""
        if self._skeleton is None:
            denoiser = copy.deepcopy(self._unwrapped)
        else:
            denoiser = distributed.gather_module(self._unwrapped, self._skeleton)
            if denoiser is None:
                return None
        if self.lora_rank:
            merge_lora(denoiser)
        return denoiser.requires_grad_(False).eval()

    def save_pretrained(self, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
        """The policy as a pipeline directory (LoRA merged), loadable with `DiffusionModel.from_pretrained` and the
        bench generators (`shapes-teacher:DIR`, `diffusers:DIR`). Sharded: every process calls it, the main one
        writes."""
        merged = self.merged_denoiser()
        if merged is None:
            return Path(out_dir)
        if dtype is not None:
            merged.to(dtype)
        self.model.with_denoiser(merged).save_pretrained(out_dir)  # text encoders and VAE shared, not copied
        return Path(out_dir)


@contextlib.contextmanager
def evaluation_weights(policy: Policy, accelerator, ema) -> Iterator:
    """The policy's model in eval mode with its plain (not DDP-wrapped; sharded stays sharded) denoiser and, with
    EMA, the EMA weights; everything is restored afterwards."""
    model, wrapped = policy.model, policy.model.denoiser
    model.denoiser = accelerator.unwrap_model(wrapped)
    model.train(False)
    try:
        with ema_weights(policy.trainable_parameters(), ema):
            yield model
    finally:
        model.denoiser = wrapped
        model.train(True)
