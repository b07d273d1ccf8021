"""Run configuration: defaults <- YAML file <- `key=value` overrides, saved with every run.

Configs are plain nested dicts so that a YAML file, a CLI override and the resolved copy written to the run
directory are the same object. Dotted keys address nested fields (`train.lr=1e-4`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from prefalign.errors import PrefalignError
from prefalign.io import atomic_write_text

CONFIG_FILENAME = "config.yaml"


def parse_value(text: str) -> Any:
    """Parse an override value with YAML rules (`1e-4` -> float, `true` -> bool, `[1,2]` -> list)."""
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads `1e-4` as a string; users mean a float.
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set `config['a']['b'] = value` for `key='a.b'`, creating intermediate dicts."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PrefalignError(f"override '{key}': '{part}' is a value, not a section; use '{part}=...'")
        node = child
    node[parts[-1]] = value


def get_dotted(config: Mapping, key: str, default: Any = None) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Recursively merge `update` into a copy of `base` (update wins; dicts merge, everything else replaces)."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PrefalignError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise PrefalignError(f"config file {path}{where} is not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise PrefalignError(f"config file {path} must hold a mapping of keys to values at the top level")
    return data


def resolve_config(
    defaults: Mapping,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    **explicit: Any,
) -> dict:
    """Resolve a run's config: defaults, then the YAML file, then `key=value` overrides, then explicit options.

    Explicit options (e.g. `seed`, `device`, `out` from CLI flags) win only when not None.
    """
    config = deep_merge(defaults, load_yaml(config_file)) if config_file else copy.deepcopy(dict(defaults))
    for item in overrides:
        if "=" not in item:
            raise PrefalignError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)")
        key, _, text = item.partition("=")
        if not key:
            raise PrefalignError(f"override '{item}' has an empty key; write key=value")
        set_dotted(config, key.strip(), parse_value(text))
    for key, value in explicit.items():
        if value is not None:
            set_dotted(config, key, value)
    return config


def save_config(config: Mapping, run_dir: str | Path) -> Path:
    """Write the resolved config into the run directory (atomically) and return its path."""
    path = Path(run_dir) / CONFIG_FILENAME
    atomic_write_text(path, yaml.safe_dump(_plain(config), sort_keys=False))
    return path


def _plain(value: Any) -> Any:
    """Make a config YAML-safe (Paths and tuples become strings and lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
