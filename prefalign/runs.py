"""Run directories and the settings every command shares: seed, device, resolved config."""

from __future__ import annotations

import fcntl
import os
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from prefalign.config import Schema, resolve_config, save_config
from prefalign.errors import PrefalignError

LOCK_FILENAME = ".lock"


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
    """Create the run directory named by `config[key]`, lock it against a second writer, remove temporary files
    a killed run left behind, and save the resolved config into it.

    A finished or killed training run (`checkpoint.pt`) is refused without `resume` before its config.yaml is
    touched, so a refused re-run leaves the run directory as it was.
    """
    out = config.get(key)
    if not out:
        raise PrefalignError(f"no output directory: pass --out DIR or set '{key}' in the config")
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise PrefalignError(f"--out {run_dir} is an existing file; pass a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PrefalignError(f"cannot create --out {run_dir} ({err.strerror}); choose a writable directory") from None
    lock_run_dir(run_dir)
    if "resume" in config and not config["resume"] and (run_dir / "checkpoint.pt").exists():
        raise PrefalignError(f"{run_dir / 'checkpoint.pt'} exists: pass --resume to continue that run, or choose "
                             "a new --out")
    for orphan in run_dir.rglob(".*.tmp"):  # atomic writes of a killed run; we hold the lock, none is live
        orphan.unlink(missing_ok=True)
    save_config(config, run_dir)
    return run_dir


_LOCKS: dict[Path, object] = {}  # run directory -> open lock file, held until the process exits


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive `flock` on `run_dir/.lock` for the life of this process; a second process writing to the
    same directory is refused in one line. The kernel drops the lock when its holder dies (even by kill -9), so a
    stale lock file never blocks. Ranks other than 0 of a multi-process launch share rank 0's run."""
    run_dir = run_dir.resolve()
    if run_dir in _LOCKS or os.environ.get("RANK", "0") != "0":
        return
    path = run_dir / LOCK_FILENAME
    try:
        handle = path.open("a+")
    except OSError as err:
        raise PrefalignError(f"cannot write to --out {run_dir} ({err.strerror}); choose a writable directory") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise PrefalignError(f"another prefalign process (pid {holder}) is writing to {run_dir}; wait for it to "
                             "finish or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCKS[run_dir] = handle


def start_run(
    defaults: Mapping, config_file: str | Path | None, overrides: list[str] | None, schema: Schema | None = None,
    command: str = "this command", **explicit: object,
) -> tuple[dict, Path]:
    """What every run command does first: resolve the config (defaults <- YAML <- overrides <- flags; validated
    when a schema is given), check the device, prepare the run directory (`prepare_run_dir`), seed everything."""
    config = resolve_config(defaults, config_file, overrides or [], schema=schema, command=command, **explicit)
    if "device" in config:
        config["device"] = str(resolve_device(config["device"]))
    run_dir = prepare_run_dir(config)
    seed_everything(int(config.get("seed", 0)))
    return config, run_dir
