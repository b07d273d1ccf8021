"""Run configuration: defaults <- YAML file <- `key=value` overrides, saved with every run.

Configs are plain nested dicts so that a YAML file, a CLI override and the resolved copy written to the run
directory are the same object. Dotted keys address nested fields (`train.lr=1e-4`).

A command's schema is its defaults dict (names and types) plus one `Field` per dotted key (documentation line,
range, choices): `validate_config` checks a resolved config against both, so an unknown key, a wrong type or an
out-of-range value is a one-line error naming the key, and `render_config` prints a config with its documentation.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
    schema: Schema | None = None,
    command: str = "this command",
    **explicit: Any,
) -> dict:
    """Resolve a run's config: defaults, then the YAML file, then `key=value` overrides, then explicit options.

    Explicit options (e.g. `seed`, `device`, `out` from CLI flags) win only when not None. With a `schema` the
    result is validated against it and the defaults (`validate_config`).
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
    if schema is not None:
        validate_config(config, defaults, schema, command)
    return config


@dataclass(frozen=True)
class Field:
    """One config key: a documentation line and what values it accepts.

    `type` is inferred from the default when not given (needed when the default is None); `nullable` defaults to
    "the default is None". `free` marks a mapping whose keys are not checked (e.g. a model architecture passed
    to diffusers, reward name -> checkpoint). `aliases`: the name the same idea has in other commands, suggested
    when a user writes it here.
    """

    doc: str
    type: type | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    nullable: bool | None = None
    free: bool = False
    aliases: tuple[str, ...] = ()


Schema = Mapping[str, Field]
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}


def validate_config(config: dict, defaults: Mapping, schema: Schema, command: str = "this command") -> dict:
    """Check `config` against `defaults` + `schema` in place (ints become floats where a number is expected, a
    single string becomes a one-element list); the first problem is a one-line PrefalignError."""
    known = sorted(set(leaf_keys(defaults)) | set(schema))
    aliases = {alias: key for key, field in schema.items() for alias in field.aliases}
    _check_node(config, defaults, schema, "", (known, aliases), command)
    return config


def leaf_keys(node: Mapping, prefix: str = "") -> Iterable[str]:
    """Dotted keys of the values in a nested config (an empty mapping counts as a value)."""
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from leaf_keys(value, dotted + ".")
        else:
            yield dotted


def _check_node(node: dict, defaults: Mapping, schema: Schema, prefix: str, known: tuple[list[str], dict],
                command: str) -> None:
    for key in list(node):
        dotted = f"{prefix}{key}"
        field = schema.get(dotted)
        has_default = isinstance(defaults, Mapping) and key in defaults
        if field is None and not has_default:
            raise PrefalignError(_unknown_key(dotted, known, command))
        default = defaults.get(key) if has_default else None
        section = isinstance(default, Mapping) and bool(default) and not (field and field.free)
        if section:
            if not isinstance(node[key], Mapping):
                raise PrefalignError(f"config key '{dotted}' is a section, not a value; set its keys, e.g. "
                                     f"'{dotted}.{next(iter(default))}=...'")
            _check_node(node[key], default, schema, dotted + ".", known, command)
        else:
            node[key] = _check_value(dotted, node[key], default, field or Field(""))


def _unknown_key(dotted: str, known_and_aliases: tuple[list[str], dict], command: str) -> str:
    known, aliases = known_and_aliases
    leaf = dotted.rsplit(".", 1)[-1]
    close = [aliases[dotted]] if dotted in aliases else difflib.get_close_matches(dotted, known, n=1, cutoff=0.6) or [
        k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"config key '{dotted}' is not a setting of {command}{hint} (--show-config lists them)"


def _check_value(dotted: str, value: Any, default: Any, field: Field) -> Any:
    expected = field.type or (type(default) if default is not None else None)
    if expected is tuple:
        expected = list
    nullable = field.nullable if field.nullable is not None else default is None
    if value is None:
        if nullable or expected is None:
            return None
        raise PrefalignError(f"config key '{dotted}' cannot be null; it expects {_TYPE_NAMES.get(expected, expected)}")
    value = _coerce(dotted, value, expected, default, field)
    if field.choices is not None and value not in field.choices:
        options = ", ".join(str(c) for c in field.choices)
        raise PrefalignError(f"config key {dotted} {_show(value)} unknown; use one of {options}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        for bound, ok, words in ((field.ge, lambda b: value >= b, ">="), (field.gt, lambda b: value > b, ">"),
                                 (field.le, lambda b: value <= b, "<=")):
            if bound is not None and not ok(bound):
                raise PrefalignError(f"config key '{dotted}' must be {words} {bound:g}, got {_show(value)}")
    return value


def _coerce(dotted: str, value: Any, expected: type | None, default: Any, field: Field) -> Any:
    if expected is None or field.free:
        if field.free and not isinstance(value, Mapping):
            raise PrefalignError(f"config key '{dotted}' expects a mapping, got {_show(value)}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if expected is str and isinstance(value, Path):
        return str(value)
    if expected is str and value is False and field.choices and "no" in field.choices:
        return "no"  # YAML 1.1 reads a bare `no` as false
    if expected is list and isinstance(value, tuple):
        return list(value)
    if expected is list and isinstance(value, str) and all(isinstance(v, str) for v in default or []):
        return [value]
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    if expected is dict and isinstance(value, Mapping):
        return dict(value)
    raise PrefalignError(f"config key '{dotted}' expects {_TYPE_NAMES.get(expected, expected.__name__)}, "
                         f"got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def render_config(config: Mapping, schema: Schema, prefix: str = "", indent: int = 0) -> str:
    """The config as YAML with each key's documentation line as a comment (`--show-config`)."""
    lines = []
    for key, value in config.items():
        dotted, pad = f"{prefix}{key}", "  " * indent
        field = schema.get(dotted)
        doc = f"  # {field.doc}" if field and field.doc else ""
        if isinstance(value, Mapping) and value:
            lines.append(f"{pad}{key}:{doc}")
            lines.append(render_config(value, {} if field and field.free else schema, dotted + ".", indent + 1))
        else:
            flow = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip()
            flow = flow.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{key}: {flow}{doc}")
    return "\n".join(lines)


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
