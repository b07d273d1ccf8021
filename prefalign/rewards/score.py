"""`prefalign score`: score image files with one or more rewards and write one CSV row per (image, reward).

Each reward is loaded once and run over all images in batches before the next one is loaded, so only one
model is in memory at a time. An unreadable image is skipped (and reported) rather than aborting the run.
"""

from __future__ import annotations

import csv
import glob
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefalign.config import parse_value
from prefalign.errors import PrefalignError
from prefalign.io import atomic_write_text
from prefalign.progress import track
from prefalign.rewards.images import IMAGE_SUFFIXES, ImageLoadError, list_image_files, load_rgb
from prefalign.rewards.registry import component_names, load
from prefalign.runs import resolve_device

CSV_COLUMNS = ("path", "prompt", "reward", "score")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SCORE_DEFAULTS: dict[str, Any] = {
    "rewards": [],
    "images": None,
    "prompts": None,
    "prompt": None,
    "out": "scores.csv",
    "batch_size": 16,
    "device": "auto",
    "dtype": "float32",
    "checkpoints": {},
    "options": {},
}


@dataclass
class ScoreReport:
    out: Path
    rows: int
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason


def collect_images(spec: str) -> tuple[list[str], list[str] | None]:
    """Image paths from a directory, a glob pattern or a CSV with a `path` column (and optional `prompt`).

    Directory and glob results are sorted by path; CSV paths are relative to the CSV's folder.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        paths = [str(p) for p in list_image_files(path)]
        if not paths:
            raise PrefalignError(
                f"--images {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the directory"
            )
        return paths, None
    if path.suffix.lower() == ".csv" and path.is_file():
        return _read_csv(path)
    matches = sorted(m for m in glob.glob(str(path)) if Path(m).is_file())
    if not matches:
        raise PrefalignError(f"--images {spec}: not a directory, a CSV file or a glob matching any file")
    return matches, None


def _read_csv(path: Path) -> tuple[list[str], list[str] | None]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise PrefalignError(f"--images {path}: the CSV needs a 'path' column (and optionally 'prompt')")
        rows = list(reader)
    if not rows:
        raise PrefalignError(f"--images {path}: the CSV has no rows")
    paths = [str(p if (p := Path(r["path"]).expanduser()).is_absolute() else path.parent / p) for r in rows]
    prompts = [r.get("prompt") or "" for r in rows] if "prompt" in (reader.fieldnames or []) else None
    return paths, prompts


def resolve_prompts(
    n_images: int, prompts_file: str | Path | None, prompt: str | None, csv_prompts: list[str] | None
) -> list[str]:
    """One prompt per image from --prompts FILE (one per line), --prompt TEXT (all images) or the CSV."""
    if prompts_file is not None and prompt is not None:
        raise PrefalignError("give either --prompts FILE or --prompt TEXT, not both")
    if prompt is not None:
        return [prompt] * n_images
    if prompts_file is not None:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise PrefalignError(f"--prompts {path}: no such file (one prompt per line, in image order)")
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) != n_images:
            raise PrefalignError(
                f"--prompts {path} has {len(lines)} lines but there are {n_images} images; "
                "give one prompt per image"
            )
        return lines
    if csv_prompts is not None:
        return csv_prompts
    raise PrefalignError("no prompts: pass --prompts FILE, --prompt TEXT or a CSV with a 'prompt' column")


def parse_checkpoint_flags(items: Sequence[str]) -> dict[str, str]:
    """`["hpsv2.1=/w/HPS_v2.1_compressed.pt"]` -> {"hpsv2.1": "/w/HPS_v2.1_compressed.pt"}."""
    result = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise PrefalignError(
                f"--checkpoint {item!r} is not NAME=PATH (e.g. hpsv2.1=HPS_v2.1_compressed.pt)"
            )
        result[name.strip()] = path.strip()
    return result


def parse_option_flags(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`["clipscore.scale=2.5", "hpsv2.1.antialias=false"]` -> {"clipscore": {"scale": 2.5}, ...}.

    The key is the part after the last dot (reward names may contain dots); values are parsed as YAML scalars.
    """
    result: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, text = item.partition("=")
        name, dot, key = target.strip().rpartition(".")
        if not sep or not dot or not name or not key:
            raise PrefalignError(f"--option {item!r} is not NAME.KEY=VALUE (e.g. clipscore.scale=2.5)")
        result.setdefault(name, {})[key] = parse_value(text)
    return result


def _check_names(
    rewards: Sequence[str], checkpoints: Mapping[str, str], options: Mapping[str, Mapping[str, Any]]
) -> None:
    """Fail before any model loads: every reward name known, every checkpoint present, nothing addressed to a
    reward that is not being scored."""
    names = {name for spec in rewards for name in component_names(spec)}
    for name, ckpt in checkpoints.items():
        if name not in names:
            raise PrefalignError(
                f"--checkpoint {name}=...: '{name}' is not among the rewards {sorted(names)}"
            )
        if not Path(ckpt).expanduser().exists():
            raise PrefalignError(f"--checkpoint {name}={ckpt}: no such file or directory")
    for name in options:
        if name not in names:
            raise PrefalignError(f"--option {name}.…: '{name}' is not among the rewards {sorted(names)}")


def score_images(
    rewards: Sequence[str],
    images: str,
    out: str | Path = "scores.csv",
    prompts: str | Path | None = None,
    prompt: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    checkpoints: Mapping[str, str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ScoreReport:
    """Score every image with every reward; write `out` (columns path, prompt, reward, score) atomically."""
    if not rewards:
        raise PrefalignError("no reward given; pass --reward NAME (e.g. --reward hpsv2.1)")
    if dtype not in DTYPES:
        raise PrefalignError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise PrefalignError(f"--batch-size {batch_size} must be at least 1")
    checkpoints = dict(checkpoints or {})
    paths, csv_prompts = collect_images(images)
    prompt_list = resolve_prompts(len(paths), prompts, prompt, csv_prompts)
    _check_names(rewards, checkpoints, options or {})
    torch_device = resolve_device(device)

    failed: dict[str, str] = {}
    rows: list[tuple[str, str, str, float]] = []
    for spec in rewards:
        model = load(spec, checkpoints, torch_device, DTYPES[dtype], per_reward=options or {})
        batches = range(0, len(paths), batch_size)
        for start in track(batches, f"scoring with {spec}", total=len(batches)):
            chunk, chunk_prompts, chunk_images = [], [], []
            for path, text in zip(
                paths[start : start + batch_size], prompt_list[start : start + batch_size], strict=True
            ):
                if path in failed:
                    continue
                try:
                    chunk_images.append(load_rgb(path))
                except ImageLoadError as err:
                    failed[path] = str(err)
                    continue
                chunk.append(path)
                chunk_prompts.append(text)
            if chunk:
                scores = model.score(chunk_images, chunk_prompts, batch_size=batch_size)
                rows += [
                    (p, t, spec, float(s))
                    for p, t, s in zip(chunk, chunk_prompts, scores.tolist(), strict=True)
                ]
        del model
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows((p, t, r, f"{s:.8g}") for p, t, r, s in rows)
    atomic_write_text(out, buffer.getvalue())
    return ScoreReport(out=Path(out), rows=len(rows), failed=failed)


def score_from_config(config: Mapping[str, Any]) -> ScoreReport:
    """`score_images(**config)` for a resolved `prefalign score` config; unknown keys are a one-line error."""
    unknown = sorted(set(config) - set(SCORE_DEFAULTS))
    if unknown:
        raise PrefalignError(f"unknown score config key(s) {unknown}; known: {', '.join(SCORE_DEFAULTS)}")
    return score_images(**config)
