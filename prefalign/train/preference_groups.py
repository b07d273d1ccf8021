"""Ranked groups: k ≥ 2 images of one prompt in order of preference, what `prefalign train-reward` reads with
`loss.kind=plackett_luce` and what `prefalign shapes labels group_size=K` writes from the shapes oracle.

On disk: a folder DIR with one `{split}.jsonl` per split (train.jsonl, validation.jsonl; `data.source=DIR`, as
for pairs), one JSON object per line, one line per prompt:

    {"caption": "a red circle", "images": ["img/0.png", "img/1.png", "img/2.png"]}
    {"caption": "two blue squares", "images": ["a.png", "b.png", "c.png", "d.png"], "ranks": [0, 1, 1, 2]}

- `caption` (string): the prompt.
- `images` (a list of at least 2): best first; paths relative to DIR (or absolute). In parquet rows, encoded
  image bytes too.
- `ranks` (optional; one integer ≥ 0 per image): the place of each image, 0 = best; equal places are ties (b.png
  and c.png above). Without it the order of `images` is the ranking, without ties.
- `oracle` (optional; one number per image): true scores, for evaluation only (the shapes world).

Groups may differ in k (batches pad to the largest). A `{split}.json` beside the file may record the simulated
labeller's `temperature` and `tie_margin` (the shapes world) for the label-noise ceiling. The same rows may come
from every source of `prefalign.train.preference_data` (a .jsonl or .parquet file, a Hub-layout folder,
`hf:NAME`), and `shapes:KIND?n=N&k=K&seed=S&temperature=T&tie_margin=M` draws N groups of K images ranked by the
oracle (`prefalign.shapes.labels.make_ranked_groups`).

Validation is strict: Pick-a-Pic pairs have known bad rows, which are skipped and counted, but a group with a
missing or malformed field, or an image that does not load, stops loading with one line naming the file, the
line and the field.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefalign.errors import PrefalignError
from prefalign.train.preference_data import CaptionRows, SkipRow, decode_image_cell, source_rows
from prefalign.train.preference_losses import prompt_weights

FORMAT = ('one JSON object per line: {"caption": PROMPT, "images": [BEST, ..., WORST], "ranks": [optional places, '
          '0 = best, equal = tie]} (see prefalign/train/preference_groups.py)')


@dataclass
class GroupBatch:
    """A collated batch of ranked groups; `candidates` float [B, K, 3, H, W] in [0, 1] (zeros where padded)."""

    captions: list[str]
    candidates: torch.Tensor
    ranks: torch.Tensor  # [B, K] long: 0 = best, equal = tie, −1 = padding
    weight: torch.Tensor  # per-prompt weight 1/n of each group
    index: torch.Tensor  # row indices in the dataset


class GroupData(CaptionRows):
    """Decoded ranked groups: `images` uint8 [N, K, 3, H, W] and `ranks` [N, K] (−1 pads groups smaller than K),
    optional `oracle` scores [N, K] (the shapes world); items are dicts like `GroupBatch` rows."""

    def __init__(self, captions: list[str], images: torch.Tensor, ranks: torch.Tensor,
                 oracle: torch.Tensor | None = None, meta: dict | None = None) -> None:
        self.captions, self.images, self.ranks, self.oracle = captions, images, ranks, oracle
        self.skipped, self.meta = {}, meta or {}  # nothing is skipped: groups are validated strictly
        self.weight = prompt_weights(captions) if captions else torch.zeros(0)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"caption": self.captions[i], "candidates": self.images[i].float() / 255, "ranks": self.ranks[i],
                "weight": float(self.weight[i]), "index": i}

    def subset(self, indices: Sequence[int]) -> GroupData:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return GroupData([self.captions[i] for i in idx.tolist()], self.images[idx], self.ranks[idx],
                         None if self.oracle is None else self.oracle[idx], dict(self.meta))

    def batch(self, rows: Sequence[int]) -> GroupBatch:
        items = [self[i] for i in rows]
        return GroupBatch([it["caption"] for it in items], torch.stack([it["candidates"] for it in items]),
                          torch.stack([it["ranks"] for it in items]), torch.tensor([it["weight"] for it in items]),
                          torch.tensor([it["index"] for it in items]))

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Every two candidates a < b of each group, as (row, a, b, columns) with the columns of `PreferenceData`:
        label_0 = 1 where a ranks above b, 0 below, 0.5 for a tie; with oracle scores also oracle_0 / oracle_1
        and the noiseless true_label_0 at the data's tie margin."""
        from prefalign.shapes.labels import noiseless_labels

        a, b = torch.triu_indices(self.ranks.shape[1], self.ranks.shape[1], offset=1)
        row = torch.arange(len(self)).repeat_interleave(len(a))
        a, b = a.repeat(len(self)), b.repeat(len(self))
        keep = (self.ranks[row, a] >= 0) & (self.ranks[row, b] >= 0)
        row, a, b = row[keep], a[keep], b[keep]
        rank_a, rank_b = self.ranks[row, a], self.ranks[row, b]
        columns = {"label_0": torch.where(rank_a == rank_b, 0.5, (rank_a < rank_b).float())}
        if self.oracle is not None:
            columns["oracle_0"], columns["oracle_1"] = self.oracle[row, a], self.oracle[row, b]
            if "tie_margin" in self.meta:
                columns["true_label_0"] = noiseless_labels(columns["oracle_0"], columns["oracle_1"],
                                                           self.meta["tie_margin"])
        return row, a, b, columns


def load_group_data(
    source: str,
    split: str = "train",
    resolution: int | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> GroupData:
    """Load, validate and decode ranked groups (format and sources: see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="prefalign-groups-") as scratch:
        rows, base, meta = source_rows(source, split, limit, Path(scratch), groups=True)
        data = _decode_groups(rows, base, resolution, limit, meta, f"{source} ({split})")
    log(f"[data] {source} ({split}): {len(data)} ranked groups of up to {data.ranks.shape[1]} images")
    return data


def _decode_groups(rows: Iterable[dict], base: Path, resolution: int | None, limit: int | None, meta: dict,
                   name: str) -> GroupData:
    captions, images, ranks, oracle = [], [], [], []
    for n, row in enumerate(rows, 1):
        if limit is not None and len(captions) >= limit:
            break
        where = row.get("_where") or f"{name} row {n}"
        caption, group, places, scores = _parse_group(row, where, base, resolution)
        size = tuple((images[0][0] if images else group[0]).shape[1:])
        other = sorted({tuple(x.shape[1:]) for x in group} - {size})
        if other:
            raise PrefalignError(f"{where}: images of {other[0]} pixels, not {size} as before: set data.resolution "
                                 "to resize them all")
        captions.append(caption)
        images.append(torch.stack(group))
        ranks.append(torch.tensor(places))
        oracle.append(scores)
    if not captions:
        raise PrefalignError(f"{name} has no ranked groups; write {FORMAT}")
    pad = torch.nn.utils.rnn.pad_sequence  # groups of fewer than K candidates: zero images, rank −1
    scores = pad(oracle, batch_first=True, padding_value=math.nan) if all(s is not None for s in oracle) else None
    return GroupData(captions, pad(images, batch_first=True), pad(ranks, batch_first=True, padding_value=-1), scores,
                     meta)


def _parse_group(row: dict, where: str, base: Path, resolution: int | None
                 ) -> tuple[str, list[torch.Tensor], list[int], torch.Tensor | None]:
    """(caption, decoded images, places, oracle scores or None) of one row, or a one-line error naming the field."""

    def bad(problem: str) -> PrefalignError:
        return PrefalignError(f"{where}: {problem}; ranked groups have {FORMAT}")

    if row.get("_unparsable"):
        raise bad("not a JSON object")
    caption, cells = row.get("caption"), row.get("images")
    if not isinstance(caption, str) or not caption.strip():
        raise bad('field "caption" is missing or not a non-empty string')
    if not isinstance(cells, list | tuple) or len(cells) < 2:
        raise bad('field "images" must be a list of at least 2 images')
    places, scores = row.get("ranks"), row.get("oracle")
    if places is None:
        places = list(range(len(cells)))
    if not isinstance(places, list | tuple) or len(places) != len(cells) or not all(map(_is_place, places)):
        raise bad(f'field "ranks" must hold one integer ≥ 0 per image ({len(cells)}), got {places!r:.80}')
    if scores is not None and (not isinstance(scores, list | tuple) or len(scores) != len(cells)
                               or not all(isinstance(v, int | float) for v in scores)):
        raise bad(f'field "oracle" must hold one number per image ({len(cells)}), got {scores!r:.80}')
    group = []
    for j, cell in enumerate(cells):
        try:
            group.append(decode_image_cell(cell, base, resolution))
        except SkipRow as skip:
            shown = f" {cell}" if isinstance(cell, str) else ""
            fix = f"no such file under {base}" if skip.reason == "missing image" else "not a readable image"
            raise bad(f'field "images" item {j}{shown}: {fix}') from None
    return caption, group, [int(p) for p in places], None if scores is None else torch.tensor(scores).float()


def _is_place(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 0
