"""Small shippable results of LoRA runs: the adapter weights of a finished run, re-applied to its base teacher.

A LoRA policy's trainable state is its adapter (a few hundred kB), while a merged pipeline is a whole model. So
`export_adapter` writes `adapter.safetensors` (float16) plus `adapter.json` (LoRA settings, the run's method and
step, the one-step generator's t_init for DI++), and `load_adapted_teacher` rebuilds the model: the base shapes
teacher (shipped unless `base` names a directory) with the adapter merged in. The demo loads the adapters that
the full benchmarks produced (prefalign/assets/aligned/).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from prefalign.diffusion.models import DiffusionModel
from prefalign.diffusion.one_step import GENERATOR_DIR
from prefalign.diffusion.one_step import META_FILE as ONE_STEP_META
from prefalign.errors import PrefalignError
from prefalign.io import atomic_save, atomic_write_text
from prefalign.shapes.teacher import load_teacher
from prefalign.train.policy import Policy

ADAPTER_FILE, META_FILE = "adapter.safetensors", "adapter.json"
# The checkpoint entry that holds the trained network's state, per method (DI++ also trains a teaching assistant).
STATE_KEYS = {"dpo": "trainable", "spo": "trainable", "dipp": "generator"}


def export_adapter(run_dir: str | Path, method: str, out_dir: str | Path, base: str | None = None,
                   benchmark: str = "") -> Path:
    """Write the LoRA adapter of a finished `prefalign align --method METHOD` run into `out_dir`; `base` is the
    teacher directory it was trained from (None: the shipped teacher), `benchmark` what made it (for the record)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    lora = config["generator"] if method == "dipp" else config["policy"]
    if not lora.get("lora_rank"):
        raise PrefalignError(f"{run_dir}: trained without LoRA; only LoRA runs export an adapter")
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    tensors = {k: v.to(torch.float16).contiguous() for k, v in state[STATE_KEYS[method]].items()}
    atomic_save(out_dir / ADAPTER_FILE, lambda p: save_file(tensors, str(p)))
    meta = {"method": method, "step": int(state["step"]), "lora_rank": lora["lora_rank"],
            "lora_alpha": lora.get("lora_alpha"), "lora_targets": lora["lora_targets"], "base": base, "benchmark": benchmark}
    if method == "dipp":
        meta["t_init"] = json.loads((run_dir / GENERATOR_DIR / ONE_STEP_META).read_text())["t_init"]
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return out_dir


def load_adapted_teacher(adapter_dir: str | Path, device: torch.device | str = "cpu") -> tuple[DiffusionModel, dict]:
    """(the base teacher with the adapter merged in, the adapter's metadata)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / META_FILE).is_file() or not (adapter_dir / ADAPTER_FILE).is_file():
        raise PrefalignError(f"{adapter_dir}: no adapter ({META_FILE} + {ADAPTER_FILE}); "
                             "make one with prefalign.train.adapters.export_adapter")
    meta = json.loads((adapter_dir / META_FILE).read_text())
    model = load_teacher(meta["base"], device)
    policy = Policy(model, meta["lora_rank"], meta["lora_alpha"], meta["lora_targets"], reference="none")
    policy.load_trainable_state({k: v.float() for k, v in load_file(str(adapter_dir / ADAPTER_FILE)).items()})
    return model.with_denoiser(policy.merged_denoiser().to(device)).eval(), meta
