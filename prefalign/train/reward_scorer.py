"""The preference scorer that `prefalign train-reward` trains, as the trainable of `prefalign.train.loop.train_loop`:
the scorer of `model.*` (optionally started from a trained one, as SPO starts its step-aware model at PickScore)
and the loss of `loss.*`, whose temperature and tie θ may train with it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from prefalign.errors import PrefalignError
from prefalign.rewards.trainable import build_scorer, load_scorer, save_scorer
from prefalign.train.common import EMA, ema_weights
from prefalign.train.preference_losses import PlackettLuceLoss, PreferenceLoss


def make_loss(loss: dict) -> nn.Module:
    """The loss of `loss.*`: Plackett–Luce on ranked groups, or a pairwise loss."""
    if loss["kind"] == "plackett_luce":
        return PlackettLuceLoss(loss["temperature"], loss["learn_temperature"], loss["top_k"])
    return PreferenceLoss(loss["kind"], loss["temperature"], loss["learn_temperature"], loss["tie_theta"],
                          loss["learn_tie_theta"])


def init_from(scorer, folder: str | Path) -> None:
    """Load a trained scorer's weights into `scorer` (same kind and backbone), as SPO starts its step-aware model
    from PickScore. A clean source fits a time-conditioned target: the wrappers that time conditioning puts around
    blocks and norms (modules with an `adaLN_modulation`) are mapped back to the wrapped module's own names, and
    the parts the source lacks (timestep embedder, modulations) keep their identity initialisation."""
    source = load_scorer(folder)
    if (source.spec["kind"], source.spec["backbone"]) != (scorer.spec["kind"], scorer.spec["backbone"]):
        raise PrefalignError(f"model.init_from {folder} is a {source.spec['kind']} scorer on {source.spec['backbone']};"
                             f" this run builds a {scorer.spec['kind']} scorer on {scorer.spec['backbone']}")
    wrapped = {f"{name}.{child}." for name, module in scorer.named_modules() if hasattr(module, "adaLN_modulation")
               for child, _ in module.named_children() if child != "adaLN_modulation"}
    state, target = source.state_dict(), scorer.state_dict()
    loaded = {}
    for key in target:
        prefix = next((w for w in wrapped if key.startswith(w)), None)
        clean = key if key in state or prefix is None else prefix.rsplit(".", 2)[0] + "." + key[len(prefix):]
        if clean in state:
            loaded[key] = state.pop(clean)
    added = [k for k in target if k not in loaded and not k.startswith("time.") and "adaLN_modulation" not in k]
    if state or added:
        raise PrefalignError(f"model.init_from {folder} does not fit this scorer (unmatched: "
                             f"{sorted(state)[:2] or added[:2]}); was it trained with other backbone options?")
    scorer.load_state_dict(loaded, strict=False)


def make_scorer(config: dict, device: torch.device) -> tuple[nn.Module, list[nn.Parameter]]:
    """The scorer of `config["model"]` on `device` in train mode, and the parameters that train."""
    model_cfg = config["model"]
    scorer = build_scorer(model_cfg["kind"], model_cfg["backbone"], model_cfg["checkpoint"],
                          time_conditioned=model_cfg["time_conditioned"], **model_cfg.get("options", {}))
    if model_cfg["init_from"]:
        init_from(scorer, model_cfg["init_from"])
    mode = model_cfg["train"] or ("full" if model_cfg["kind"] == "clip" else "frozen")
    params = scorer.set_trainable(mode, model_cfg["lora_rank"], model_cfg["lora_alpha"])
    if config["train"]["gradient_checkpointing"]:
        scorer.set_gradient_checkpointing(True)
    return scorer.to(device).train(), params


class ScorerAndLoss(nn.Module):
    """The scorer and the loss with its parameters (temperature, tie θ) as one module, so that DDP averages the
    loss's gradients with the scorer's; calling it scores."""

    def __init__(self, scorer: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.scorer, self.loss = scorer, loss

    def forward(self, images: torch.Tensor, prompts: list[str], t: torch.Tensor | None = None) -> torch.Tensor:
        return self.scorer(images, prompts, t)


class ScorerTrainable:
    """A preference scorer and its loss as the trainable of `train_loop`, saved as a scorer directory."""

    def __init__(self, scorer: nn.Module, params: list[nn.Parameter], loss: nn.Module,
                 meta: Callable[[], dict]) -> None:
        self.module = self.model = ScorerAndLoss(scorer, loss)  # `model`: DDP-wrapped after `prepare`
        self.loss_params = [p for p in loss.parameters() if p.requires_grad]
        self.params, self.meta = params + self.loss_params, meta

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.params

    def prepare(self, accelerator, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.loss_params:  # the loss's temperature and θ are no weights: no weight decay on them
            group = optimizer.param_groups[0]
            group["params"] = [p for p in group["params"] if all(p is not q for q in self.loss_params)]
            optimizer.add_param_group({"params": self.loss_params, "weight_decay": 0.0})
        self.model, optimizer = accelerator.prepare(self.module, optimizer)
        return optimizer

    def trainable_state(self) -> dict:
        return {"scorer": self.module.scorer.trainable_state(), "loss": self.module.loss.state_dict()}

    def load_trainable_state(self, state: dict) -> None:
        self.module.scorer.load_trainable_state(state["scorer"])
        self.module.loss.load_state_dict(state["loss"])

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    @contextlib.contextmanager
    def evaluation(self, accelerator, ema: EMA | None) -> Iterator[ScorerAndLoss]:
        self.module.eval()
        try:
            with ema_weights(self.params, ema):
                yield self.module
        finally:
            self.module.train()

    def train(self) -> None:
        self.module.train()

    def save(self, out_dir: Path, main: bool) -> None:
        if main:
            save_scorer(self.module.scorer, out_dir, self.meta())


