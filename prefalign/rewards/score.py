"""`prefalign score`: score image files with one or more rewards and write one CSV row per (image, reward).

All rewards are loaded (so a bad checkpoint fails before any work), then one pass over the images serves them
all (prefalign.rewards.multi: decode once, shared preprocessing and image towers). Rows are appended batch by
batch; re-running the same command after a kill computes only the missing rows. An unreadable image is
skipped (and reported) rather than aborting the run.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefalign.config import parse_value
from prefalign.errors import PrefalignError
from prefalign.io import atomic_write_text
from prefalign.progress import track
from prefalign.rewards.images import IMAGE_SUFFIXES, list_image_files
from prefalign.rewards.multi import RewardPass
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
    "workers": 2,  # image-decoding processes overlapping the forward passes (0: decode in this process)
    "fast": False,  # bfloat16 autocast + channels-last: faster, not bit-exact (see benchmarks/RESULTS.md)
}


@dataclass
class ScoreReport:
    out: Path
    rows: int  # rows written by this run
    kept: int = 0  # rows already in `out` from an earlier run, not recomputed
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason
    notes: list[str] = field(default_factory=list)  # one-line warnings, e.g. an animated GIF's first frame


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


def _check_writable(out: Path) -> None:
    """Fail before any model loads when `out` cannot be written (a directory, a read-only folder)."""
    if out.is_dir():
        raise PrefalignError(f"--out {out} is a directory; give a CSV file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise PrefalignError(f"--out {out}: cannot write there ({err.strerror or err})") from None


def _settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def _resume_rows(out: Path, settings: dict[str, Any]) -> set[tuple[str, str]]:
    """(path, reward) pairs already in `out` from an earlier (possibly killed) run with the same settings per
    reward; a partial last line is cut off. A file that is not a score CSV is refused, not overwritten."""
    if not out.exists() or out.stat().st_size == 0:
        return set()
    data = out.read_bytes()
    if not data.endswith(b"\n"):  # killed mid-write: drop the unfinished row
        with out.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
    with out.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        if next(reader, None) != list(CSV_COLUMNS):
            raise PrefalignError(f"--out {out} exists and is not a prefalign score CSV; pass a new --out")
        done = {(row[0], row[2]) for row in reader if len(row) == len(CSV_COLUMNS)}
    previous = json.loads(sp.read_text()) if (sp := _settings_path(out)).is_file() else {}
    for spec, values in settings.items():
        if spec in previous and previous[spec] != values:
            raise PrefalignError(
                f"--out {out} holds {spec} scores made with other checkpoints/options/dtype; pass a new --out "
                "or delete it"
            )
    return done


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
    workers: int = 2,
    fast: bool = False,
) -> ScoreReport:
    """Score every image with every reward in one pass; append rows to `out` (path, prompt, reward, score) as
    batches finish, so a killed run resumes where it stopped (no row lost or written twice)."""
    if not rewards:
        raise PrefalignError("no reward given; pass --reward NAME (e.g. --reward hpsv2.1)")
    if dtype not in DTYPES:
        raise PrefalignError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise PrefalignError(f"--batch-size {batch_size} must be at least 1")
    checkpoints, options, out = dict(checkpoints or {}), dict(options or {}), Path(out)
    paths, csv_prompts = collect_images(images)
    prompt_list = resolve_prompts(len(paths), prompts, prompt, csv_prompts)
    _check_names(rewards, checkpoints, options)
    _check_writable(out)
    specs = list(dict.fromkeys(rewards))
    settings = {spec: _spec_settings(spec, checkpoints, options, dtype) for spec in specs}
    done = _resume_rows(out, settings)
    todo = [i for i, p in enumerate(paths) if any((p, spec) not in done for spec in specs)]
    report = ScoreReport(out=out, rows=0, kept=len(done))
    if not todo:
        return report
    torch_device = resolve_device(device)
    models = {spec: load(spec, checkpoints, torch_device, DTYPES[dtype], per_reward=options) for spec in specs}
    previous = json.loads(sp.read_text()) if (sp := _settings_path(out)).is_file() else {}
    atomic_write_text(_settings_path(out), json.dumps({**previous, **settings}, indent=1, sort_keys=True))
    scoring = RewardPass(models, batch_size=batch_size, workers=workers, fast=fast)
    sources, texts = [paths[i] for i in todo], [prompt_list[i] for i in todo]
    batches = scoring.run(sources, texts)
    with out.open("a", newline="", encoding="utf-8") as fh:
        if fh.tell() == 0:
            fh.write(",".join(CSV_COLUMNS) + "\n")
        for batch in track(batches, f"scoring with {', '.join(specs)}", total=-(-len(todo) // batch_size)):
            report.failed.update({sources[i]: reason for i, reason in batch.failed.items()})
            report.notes += batch.notes
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            for row, i in enumerate(batch.indices):
                for spec in specs:
                    if (sources[i], spec) not in done:
                        writer.writerow((sources[i], texts[i], spec, f"{batch.scores[spec][row]:.8g}"))
                        report.rows += 1
            fh.write(buffer.getvalue())  # one write per batch, flushed: a kill loses at most this batch
            fh.flush()
            os.fsync(fh.fileno())
    return report


def _spec_settings(spec: str, checkpoints: Mapping[str, str], options: Mapping[str, Any], dtype: str) -> dict:
    names = component_names(spec)
    settings = {"checkpoints": {n: str(checkpoints[n]) for n in names if n in checkpoints},
                "options": {n: dict(options[n]) for n in names if n in options}, "dtype": dtype}
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the settings file


def score_from_config(config: Mapping[str, Any]) -> ScoreReport:
    """`score_images(**config)` for a resolved `prefalign score` config; unknown keys are a one-line error."""
    unknown = sorted(set(config) - set(SCORE_DEFAULTS))
    if unknown:
        raise PrefalignError(f"unknown score config key(s) {unknown}; known: {', '.join(SCORE_DEFAULTS)}")
    return score_images(**config)
