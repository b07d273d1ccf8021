"""Reward registry: `load("hpsv2.1")`, `load("0.5*hpsv2.1+aesthetic")`, `register(name, factory)`.

A reward not registered in code can still be named wherever a reward name goes (the CLI included): as
`package.module:function` (a factory), or by the name of an installed `prefalign.rewards` entry point.

A factory is called as `factory(checkpoint, device, dtype, **options)` and returns a RewardModel. Built-in
entries are "module:function" strings imported on first use, so `import prefalign.rewards` stays light and an
adapter's heavy dependencies load only when that reward is asked for.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from prefalign.errors import PrefalignError
from prefalign.rewards.base import RewardModel
from prefalign.rewards.combine import WeightedSumReward

Factory = Callable[..., RewardModel]
CheckpointArg = str | Path | Mapping[str, str | Path] | None


_FACTORIES: dict[str, Factory | str] = {
    "aesthetic": "prefalign.rewards.aesthetic:load_aesthetic",
    "imagereward": "prefalign.rewards.imagereward:load_imagereward",
    "hpsv2": "prefalign.rewards.hps:load_hpsv2",
    "hpsv2.1": "prefalign.rewards.hps:load_hpsv21",
    "hpsv3": "prefalign.rewards.hpsv3:load_hpsv3",
    "pickscore": "prefalign.rewards.pickscore:load_pickscore",
    "clipscore": "prefalign.rewards.clipscore:load_clipscore",
    "step-aware": "prefalign.rewards.step_aware:load_step_aware",
    "trained": "prefalign.rewards.step_aware:load_trained",
    "shapes-oracle": "prefalign.shapes.rewards:load_shapes_oracle",
    "shapes-clip": "prefalign.shapes.rewards:load_shapes_clip_reward",
}

_PLAIN_NAME = r"[A-Za-z][\w.]*(?:-[A-Za-z][\w.]*)*"
# A term may also be a plugin named as `package.module:factory` (imported on first use).
_NAME = rf"{_PLAIN_NAME}(?::[A-Za-z_]\w*)?"
ENTRY_POINT_GROUP = "prefalign.rewards"  # installed packages may register rewards under this group
_TERM = re.compile(
    rf"\s*(?P<sign>[+-])?\s*(?:(?P<weight>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*)?(?P<name>{_NAME})\s*"
)


def available() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_FACTORIES)


def register(name: str, factory: Factory | str, *, replace: bool = False) -> None:
    """Add a reward under `name`. `factory` is a callable or a lazy "module:function" string.

    Re-registering a name with a different factory needs `replace=True` (guards against two plugins clashing).
    """
    if not re.fullmatch(_PLAIN_NAME, name):
        raise ValueError(
            f"reward name {name!r} must start with a letter and use only letters, digits, '_', '.', '-'"
        )
    if name in _FACTORIES and _FACTORIES[name] is not factory and not replace:
        raise ValueError(f"reward '{name}' is already registered; pass replace=True to override it")
    _FACTORIES[name] = factory


def _plugin(name: str) -> str | None:
    """`module:factory` as given, or the target of an installed `prefalign.rewards` entry point `name`."""
    if ":" in name:
        return name
    from importlib.metadata import entry_points

    return next((ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)


def _resolve_factory(name: str) -> Factory:
    if name not in _FACTORIES:
        plugin = _plugin(name)
        if plugin is None:
            raise PrefalignError(
                f"unknown reward '{name}'; known rewards: {', '.join(available())} "
                "(or name your own factory as package.module:function)"
            )
        _FACTORIES[name] = plugin
    factory = _FACTORIES[name]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise PrefalignError(
                f"reward '{name}' is registered as {module_name}:{attr}, which is unavailable ({err})"
            ) from None
        _FACTORIES[name] = factory
    return factory


def parse_spec(spec: str) -> list[tuple[float, str]]:
    """`"0.5*hpsv2.1+aesthetic-0.1*clipscore"` -> [(0.5, "hpsv2.1"), (1.0, "aesthetic"), (-0.1,
    "clipscore")]."""
    terms, pos = [], 0
    while pos < len(spec):
        match = _TERM.match(spec, pos)
        if match is None or match.end() == pos or (terms and match["sign"] is None):
            raise PrefalignError(
                f"cannot parse reward spec {spec!r} at position {pos}; write e.g. 0.5*hpsv2.1+aesthetic"
            )
        weight = float(match["weight"] or 1.0) * (-1.0 if match["sign"] == "-" else 1.0)
        terms.append((weight, match["name"]))
        pos = match.end()
    if not terms:
        raise PrefalignError("empty reward spec; name a reward, e.g. hpsv2.1")
    return terms


def component_names(spec: str) -> list[str]:
    """The distinct registered names a reward spec uses; an unknown one raises (listing the known names)."""
    single = spec in _FACTORIES or re.fullmatch(_NAME, spec)
    names = [spec] if single else list(dict.fromkeys(name for _, name in parse_spec(spec)))
    for name in names:
        _resolve_factory(name)
    return names


def _checkpoint_for(name: str, checkpoint: CheckpointArg) -> str | Path | None:
    if isinstance(checkpoint, Mapping):
        return checkpoint.get(name)
    return checkpoint


def _load_one(
    name: str, checkpoint: str | Path | None, device: str | torch.device, dtype: torch.dtype, options: Mapping
) -> RewardModel:
    factory = _resolve_factory(name)
    try:
        return factory(checkpoint, device, dtype, **options)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        bad = str(err).rsplit("argument", 1)[-1].strip()
        raise PrefalignError(
            f"reward '{name}' has no option {bad}; see the docstring of its loader"
        ) from None


def load(
    name: str,
    checkpoint: CheckpointArg = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    per_reward: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> RewardModel:
    """Load a registered reward, or a weighted sum of them (`"0.5*hpsv2.1+aesthetic"`).

    `checkpoint` is a path, or a mapping from reward name to path (needed for sums). `options` go to a single
    reward's factory; `per_reward` maps reward names to options and works for sums too.
    """
    per_reward = per_reward or {}
    if name in _FACTORIES or re.fullmatch(_NAME, name):
        return _load_one(
            name, _checkpoint_for(name, checkpoint), device, dtype, {**per_reward.get(name, {}), **options}
        )
    terms = parse_spec(name)
    component_names(name)  # every name is checked (unknown -> list of known names) before any loading
    if options:
        raise PrefalignError(f"options {sorted(options)} are ambiguous for the sum {name!r}; pass per_reward")
    if checkpoint is not None and not isinstance(checkpoint, Mapping):
        raise PrefalignError(
            f"a single checkpoint path is ambiguous for the sum {name!r}; map names to paths"
        )
    models: dict[str, RewardModel] = {}
    for _, term in terms:  # a name used twice is loaded once
        if term not in models:
            models[term] = _load_one(
                term, _checkpoint_for(term, checkpoint), device, dtype, per_reward.get(term, {})
            )
    return WeightedSumReward([(w, models[t]) for w, t in terms])
