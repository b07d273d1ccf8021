"""Many rewards in one pass over a stream of images (`prefalign score -r a -r b`, the bench).

- Each image is decoded once, in DataLoader worker processes that overlap the models' forward passes.
- Each distinct preprocessing (rewards declare `preprocess_key`) runs once per image.
- Rewards that run the same image tower on the same pixels (`tower_id`: e.g. aesthetic and CLIPScore on the
  same OpenAI ViT-L/14 file) share one forward of it; each then applies its own head / text side.
- Weighted sums are split into their components, so `a` and `0.5*a+b` together cost one `a` and one `b`.
- Batches stream through: memory does not grow with the number of images.
Rewards without this protocol (shapes-oracle, custom ones) get each batch through their own `score`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from prefalign.rewards.base import ImageLike, RewardModel
from prefalign.rewards.combine import WeightedSumReward
from prefalign.rewards.images import ImageLoadError, ImageWarning, decode, to_rgb


@dataclass
class ScoredBatch:
    """One streamed batch: the positions scored, those that could not be read, one score list per spec."""

    indices: list[int]
    failed: dict[int, str]
    scores: dict[str, list[float]]
    notes: list[str] = field(default_factory=list)  # one-line warnings (e.g. an animated GIF's first frame)


def _is_pixel_reward(reward: RewardModel) -> bool:
    return all(hasattr(reward, a) for a in ("preprocess_key", "preprocess_pil", "reward_from_pixels"))


class _Decoded(Dataset):
    """Item i: the decoded image once, every distinct preprocessing of it, and its 8-bit RGB pixels when a
    reward without the pixel protocol needs them."""

    def __init__(self, sources: Sequence[ImageLike], preprocess: Mapping[Any, tuple[Any, bool]], rgb: bool):
        self.sources, self.preprocess, self.rgb = sources, preprocess, rgb

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                img = decode(self.sources[i])
                rgb = to_rgb(img)
            except ImageLoadError as err:
                return i, None, None, str(err), []
        # Preprocessing of a readable image never fails quietly: its errors propagate.
        pixels = {key: fn(img if native else rgb) for key, (fn, native) in self.preprocess.items()}
        raw = torch.from_numpy(np.array(rgb)).permute(2, 0, 1) if self.rgb else None
        return i, pixels, raw, None, [str(w.message) for w in caught]


def _collate(items: list[tuple]) -> dict[str, Any]:
    ok = [it for it in items if it[3] is None]
    keys = ok[0][1].keys() if ok else ()
    return {
        "indices": [it[0] for it in ok],
        "failed": {it[0]: it[3] for it in items if it[3] is not None},
        "pixels": {k: torch.stack([it[1][k] for it in ok]) for k in keys},
        "raw": [it[2] for it in ok],
        "notes": [note for it in items for note in it[4]],
    }


def _leaves(model: RewardModel) -> list[tuple[float, RewardModel]]:
    """A weighted sum as its (weight, component) terms; any other reward as itself."""
    if isinstance(model, WeightedSumReward):
        return [
            (w * lw, leaf)
            for w, r in zip(model.weights, model.rewards, strict=True)
            for lw, leaf in _leaves(r)
        ]
    return [(1.0, model)]


class RewardPass:
    """Score a stream of (image, prompt) pairs with several loaded rewards at once.

    `rewards` maps a column name (the spec) to a loaded reward. `workers` decoding processes (0: decode in
    this process). `fast=True` runs the forwards under bfloat16 autocast with channels-last pixels (an opt-in
    speed/accuracy trade; see benchmarks/RESULTS.md for its measured |Δ|).
    """

    def __init__(
        self, rewards: Mapping[str, RewardModel], batch_size: int = 16, workers: int = 2, fast: bool = False
    ) -> None:
        self.batch_size, self.workers, self.fast = max(1, batch_size), max(0, workers), fast
        self.leaves: list[RewardModel] = []
        self.terms: dict[str, list[tuple[float, int]]] = {}
        for spec, model in rewards.items():
            self.terms[spec] = [(w, self._leaf_index(leaf)) for w, leaf in _leaves(model)]
        self.preprocess: dict[Any, tuple[Any, bool]] = {}
        # (tower, pixels, dtype) -> (pixels key, pixel leaves sharing one forward of that tower)
        self.groups: dict[Any, tuple[Any, list[int]]] = {}
        self.generic: list[int] = []
        for index, leaf in enumerate(self.leaves):
            if not _is_pixel_reward(leaf):
                self.generic.append(index)
                continue
            pkey = leaf.preprocess_key if leaf.preprocess_key is not None else ("own", index)
            self.preprocess.setdefault(pkey, (leaf.preprocess_pil, getattr(leaf, "native_mode", False)))
            tower = getattr(leaf, "tower_id", None)
            group = (tower, pkey, _dtype(leaf)) if tower is not None else ("own", index)
            self.groups.setdefault(group, (pkey, []))[1].append(index)

    def _leaf_index(self, leaf: RewardModel) -> int:
        for index, known in enumerate(self.leaves):
            if known is leaf:
                return index
        self.leaves.append(leaf)
        return len(self.leaves) - 1

    def run(self, sources: Sequence[ImageLike], prompts: Sequence[str]) -> Iterator[ScoredBatch]:
        """Yield one ScoredBatch per `batch_size` consecutive sources, in order."""
        dataset = _Decoded(sources, self.preprocess, rgb=bool(self.generic))
        workers = min(self.workers, len(sources))
        # Forked workers inherit the preprocessing callables; spawned ones would pickle whole models.
        context = "fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None
        loader = DataLoader(
            dataset, batch_size=self.batch_size, num_workers=workers, collate_fn=_collate,
            multiprocessing_context=context,
        )
        for batch in loader:
            for note in batch["notes"]:
                warnings.warn(note, ImageWarning, stacklevel=2)
            texts = [prompts[i] for i in batch["indices"]]
            if texts:
                leaf_scores = self._score_leaves(batch, texts)
                scores = {
                    spec: _weighted(terms, leaf_scores, len(texts)) for spec, terms in self.terms.items()
                }
            else:  # every image of the batch was unreadable
                scores = {spec: [] for spec in self.terms}
            yield ScoredBatch(batch["indices"], batch["failed"], scores, batch["notes"])

    @torch.inference_mode()
    def _score_leaves(self, batch: dict[str, Any], texts: list[str]) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for pkey, members in self.groups.values():
            first = self.leaves[members[0]]
            pixels = batch["pixels"][pkey]
            for index in members:
                self.leaves[index].warn_prompts(texts)
            with self._autocast(first):
                pixels = pixels.to(memory_format=torch.channels_last) if self.fast else pixels
                if len(members) == 1:
                    out[members[0]] = first.reward_from_pixels(pixels, texts).float().cpu()
                    continue
                features = first.encode_image(pixels)
                for index in members:
                    out[index] = self.leaves[index].reward_from_features(features, texts).float().cpu()
        if self.generic:
            images = [x.float() / 255 for x in batch["raw"]]
            same = len({tuple(x.shape) for x in images}) == 1
            stacked = torch.stack(images) if same else images
            for index in self.generic:
                scores = self.leaves[index].score(stacked, texts, batch_size=self.batch_size)
                out[index] = scores.float().cpu()
        return out

    def _autocast(self, reward: RewardModel) -> contextlib.AbstractContextManager:
        if not self.fast:
            return contextlib.nullcontext()
        device = next(reward.parameters()).device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16)


def _dtype(reward: RewardModel) -> torch.dtype | None:
    return next((p.dtype for p in reward.parameters()), None)


def _weighted(terms: list[tuple[float, int]], leaf_scores: Mapping[int, torch.Tensor], n: int) -> list[float]:
    total = torch.zeros(n)
    for weight, index in terms:
        total += weight * leaf_scores[index]
    return total.tolist()
