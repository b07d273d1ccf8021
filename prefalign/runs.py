"""Run directories and the settings every command shares: seed, device, resolved config."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from prefalign.config import resolve_config, save_config
from prefalign.errors import PrefalignError


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str | None) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an unavailable device is a one-line error."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PrefalignError(f"--device '{name}' is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrefalignError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return device


def prepare_run_dir(config: Mapping, key: str = "out") -> Path:
    """Create the run directory named by `config[key]` and save the resolved config into it."""
    out = config.get(key)
    if not out:
        raise PrefalignError(f"no output directory: pass --out DIR or set '{key}' in the config")
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    return run_dir


def start_run(
    defaults: Mapping, config_file: str | Path | None, overrides: list[str] | None, **explicit: object
) -> tuple[dict, Path]:
    """What every run command does first: resolve the config (defaults <- YAML <- overrides <- flags), check the
    device, create the run directory with the resolved config in it, and seed everything."""
    config = resolve_config(defaults, config_file, overrides or [], **explicit)
    if "device" in config:
        config["device"] = str(resolve_device(config["device"]))
    run_dir = prepare_run_dir(config)
    seed_everything(int(config.get("seed", 0)))
    return config, run_dir
