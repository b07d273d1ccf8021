"""Prompt suites for `prefalign bench`: COCO-2017 val captions, PartiPrompts, DrawBench, the HPSv2 benchmark,
Pick-a-Pic validation, the shapes-world val set and user files.

Lists that cannot be shipped are read from the user's copy in its official published format (the error says
where to get it); only the shapes prompts, which prefalign writes itself, are built in.

Selection rules (recorded in every report):
- COCO-2017 val: images in ascending image id; each image's captions in ascending annotation id; the caption
  is the first draw of `numpy.random.default_rng([seed, image_id]).integers(n_captions)` — one caption per
  image, fixed by the seed, independent of how many prompts are asked for; whitespace runs become one space.
- `--num-prompts N` smaller than the suite: the first N of `numpy.random.default_rng(seed).permutation(M)`,
  kept in suite order, so for one seed a smaller N is a subset of a larger one. Unset: every prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prefalign.errors import PrefalignError

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
PROMPT_COLUMNS = ("prompt", "prompts", "caption", "text")
GROUP_COLUMNS = ("category", "style", "group")
# Where to get each suite that needs a user file; the error for a missing file prints this line.
HOW_TO_GET = {
    "coco-val": "download http://images.cocodataset.org/annotations/annotations_trainval2017.zip, unzip it "
    "and pass --captions annotations/captions_val2017.json",
    "parti": "download PartiPrompts.tsv from https://github.com/google-research/parti (or the parquet of the "
    "Hugging Face dataset nateraw/parti-prompts) and pass --prompts-file FILE",
    "drawbench": "export the DrawBench sheet linked from https://imagen.research.google (columns Prompts, "
    "Category) as CSV, or take the parquet of the Hugging Face dataset sayakpaul/drawbench, and pass "
    "--prompts-file FILE",
    "hps": "download benchmark/{anime,concept-art,paintings,photo}.json of the Hugging Face dataset "
    "zhwang/HPDv2 and pass --prompts-file with their folder",
    "pickapic-val": "download the validation_unique parquet of the Hugging Face dataset "
    "yuvalkirstain/pickapic_v1 (data/validation_unique-*.parquet) and pass --prompts-file FILE",
}
SUITE_NAMES = (*HOW_TO_GET, "shapes-val", "file:PATH")


@dataclass(frozen=True)
class PromptItem:
    """One prompt: a stable id (the same prompt keeps it across --num-prompts), its text and its category."""

    id: str
    text: str
    group: str = ""


@dataclass(frozen=True)
class Suite:
    name: str
    prompts: tuple[PromptItem, ...]
    source: str  # the file read, or "built-in"
    rule: str  # how the prompts were chosen, for the report


def load_suite(
    name: str, prompts_file: str | Path | None = None, num_prompts: int | None = None, seed: int = 0
) -> Suite:
    """Resolve a suite name (see SUITE_NAMES) to its prompts, selected as the module docstring describes."""
    if name.startswith("file:"):
        path = _existing(
            Path(name[5:]).expanduser(), f"suite {name}", "pass file:PATH with a .txt, .csv or .jsonl"
        )
        items, source, rule = _table_prompts(path, "file"), str(path), "file order"
    elif name == "shapes-val":
        from prefalign.shapes.prompts import prompt_set

        items = [PromptItem(f"shapes-val:{i:03d}", p) for i, p in enumerate(prompt_set("val"))]
        source, rule = "built-in (prompts/shapes_val.txt)", "file order"
    elif name in HOW_TO_GET:
        if prompts_file is None:
            raise PrefalignError(f"suite {name} reads the user's copy of its prompts: {HOW_TO_GET[name]}")
        path = _existing(Path(prompts_file).expanduser(), f"--prompts-file for {name}", HOW_TO_GET[name])
        if name == "coco-val" and path.is_dir():  # the unzipped annotations/ folder
            path = _existing(path / "captions_val2017.json", f"--captions for {name}", HOW_TO_GET[name])
        items, rule = _LOADERS[name](path, seed), "file order"
        if name == "coco-val":
            rule = f"one caption per image: default_rng([{seed}, image_id]).integers(n_captions)"
        source = str(path)
    else:
        raise PrefalignError(f"unknown suite '{name}'; use one of {', '.join(SUITE_NAMES)}")
    if not items:
        raise PrefalignError(f"suite {name} ({source}) holds no prompts")
    chosen, how = select_prompts(items, num_prompts, seed, name)
    return Suite(name, tuple(chosen), source, f"{rule}; {how}")


def suite_from_prompts(
    name: str, prompts: Sequence[str], source: str = "given", rule: str = "as given"
) -> Suite:
    """A suite made of prompts given in code or on the command line (ids are positions)."""
    if not prompts:
        raise PrefalignError("no prompts given; pass a suite or at least one --prompt")
    items = tuple(PromptItem(f"{name}:{i:05d}", p) for i, p in enumerate(prompts))
    return Suite(name, items, source, rule)


def select_prompts(
    items: Sequence[PromptItem], num_prompts: int | None, seed: int, name: str = "suite"
) -> tuple[list[PromptItem], str]:
    """All items, or the first `num_prompts` of a seeded permutation kept in suite order (nested in N)."""
    if num_prompts is None or num_prompts == len(items):
        return list(items), f"all {len(items)} prompts"
    if not 1 <= num_prompts <= len(items):
        raise PrefalignError(
            f"--num-prompts {num_prompts}: suite {name} has {len(items)} prompts; ask for 1..{len(items)}"
        )
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:num_prompts])
    return [
        items[i] for i in keep
    ], f"{num_prompts} of {len(items)} prompts: default_rng({seed}).permutation, first N"


def coco_captions(path: Path, seed: int) -> list[PromptItem]:
    """One caption per image of the official `captions_val2017.json` (rule in the module docstring)."""
    try:
        data = json.loads(_read_text(path))
        annotations = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        what = f"not the official COCO captions JSON ({type(err).__name__})"
        raise PrefalignError(f"--captions {path}: {what}; {HOW_TO_GET['coco-val']}") from None
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann in annotations:
        by_image.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), str(ann["caption"])))
    items = []
    for image_id in sorted(by_image):
        captions = [text for _, text in sorted(by_image[image_id])]
        pick = int(np.random.default_rng([seed, image_id]).integers(len(captions)))
        items.append(PromptItem(f"coco:{image_id}", " ".join(captions[pick].split())))
    return items


def hps_prompts(path: Path, seed: int = 0) -> list[PromptItem]:
    """The four HPSv2 benchmark styles, each `{style}.json` a list of prompts (ids match `{idx:05d}.jpg`)."""
    folder = path / "benchmark" if (path / "benchmark" / f"{HPS_STYLES[0]}.json").is_file() else path
    items = []
    for style in HPS_STYLES:
        file = _existing(folder / f"{style}.json", f"hps style {style}", HOW_TO_GET["hps"])
        prompts = _json_list(file)
        items += [PromptItem(f"hps:{style}:{i:05d}", str(p), style) for i, p in enumerate(prompts)]
    return items


def _table_suite(suite: str, dedupe: bool = False):
    def load(path: Path, seed: int = 0) -> list[PromptItem]:
        items = _table_prompts(path, suite)
        if dedupe:  # the Pick-a-Pic protocol scores unique prompts; `validation` repeats them, `_unique` not
            first = {}
            for item in items:
                first.setdefault(item.text, item)
            items = list(first.values())
        return items

    return load


def _table_prompts(path: Path, suite: str) -> list[PromptItem]:
    """Prompts of a .txt (one per line), .csv/.tsv, .json/.jsonl (strings or objects) or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = _read_text(path).splitlines()
        return [PromptItem(f"{suite}:{i:05d}", line.strip()) for i, line in enumerate(lines) if line.strip()]
    frame = _read_frame(path, suffix)
    prompt_col = _column(frame.columns, PROMPT_COLUMNS)
    if prompt_col is None:
        found = ", ".join(map(str, frame.columns))
        raise PrefalignError(
            f"{path}: no prompt column ({', '.join(PROMPT_COLUMNS)}, any case); found {found}"
        )
    group_col = _column(frame.columns, GROUP_COLUMNS)
    groups = frame[group_col].astype(str) if group_col is not None else [""] * len(frame)
    return [
        PromptItem(f"{suite}:{i:05d}", str(text).strip(), group)
        for i, (text, group) in enumerate(zip(frame[prompt_col], groups, strict=True))
        if isinstance(text, str) and text.strip()
    ]


def _read_frame(path: Path, suffix: str) -> pd.DataFrame:
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        if suffix == ".jsonl":
            rows = [
                json.loads(line) for line in _read_text(path).splitlines() if line.strip()
            ]
            return pd.DataFrame([{"prompt": r} if isinstance(r, str) else r for r in rows])
        if suffix == ".json":
            rows = _json_list(path)
            return pd.DataFrame([{"prompt": r} if isinstance(r, str) else r for r in rows])
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            # Pick-a-Pic parquets carry both images as bytes: read only the text columns.
            names = pq.read_schema(path).names
            wanted = [c for c in (_column(names, PROMPT_COLUMNS), _column(names, GROUP_COLUMNS)) if c]
            return pd.read_parquet(path, columns=wanted or None)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrefalignError(f"{path}: cannot read prompts ({first})") from None
    raise PrefalignError(
        f"{path}: unsupported prompt file type '{suffix}'; use .txt, .csv, .tsv, .json, .jsonl or .parquet"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PrefalignError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                             "save it as UTF-8") from None


def _json_list(path: Path) -> list:
    try:
        data = json.loads(_read_text(path))
    except (OSError, ValueError) as err:
        raise PrefalignError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise PrefalignError(f"{path}: expected a JSON list of prompts (or of objects with a prompt field)")
    return data


def _column(columns, candidates: Sequence[str]) -> str | None:
    lower = {str(c).lower(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def _existing(path: Path, what: str, hint: str) -> Path:
    if not path.exists():
        raise PrefalignError(f"{what}: {path} does not exist; {hint}")
    return path


_LOADERS = {
    "coco-val": coco_captions,
    "parti": _table_suite("parti"),
    "drawbench": _table_suite("drawbench"),
    "hps": hps_prompts,
    "pickapic-val": _table_suite("pickapic", dedupe=True),
}
