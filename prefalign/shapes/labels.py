"""Simulated human preference labels from the oracle, written as a Pick-a-Pic-style dataset.

Label model (Bradley–Terry with a tie band): for a pair with oracle scores s0, s1 and Δ = s0 − s1,

    |Δ| < tie_margin  → tie: label_0 = label_1 = 0.5
    otherwise         → label_0 ~ Bernoulli(σ(Δ / temperature)), label_1 = 1 − label_0

The noiseless preference ("true_label_0") is 1 if Δ ≥ tie_margin, 0 if Δ ≤ −tie_margin, else 0.5. The
label-noise ceiling E[σ(|Δ| / T)] over non-tied pairs is the expected agreement of the noisy labels with the
noiseless preference — equivalently the accuracy that a perfect reward (the oracle itself) is expected to
reach against the noisy labels.

Dataset layout (one parquet file per split, columns follow the Pick-a-Pic v2 HF dataset where they exist):
caption (str), jpg_0 / jpg_1 (PNG bytes — the column names are Pick-a-Pic's; PIL opens either format),
label_0 / label_1 (float: 1/0, 0/1 or 0.5/0.5), model_0 / model_1 (image source name), plus the
evaluation-only columns oracle_0 / oracle_1 (oracle scores) and true_label_0 (noiseless preference). A
`{split}.json` beside it records the settings and summary numbers.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from prefalign.errors import PrefalignError
from prefalign.io import atomic_save, atomic_write_text
from prefalign.shapes.grammar import sample_scene, scene_to_prompt
from prefalign.shapes.oracle import oracle
from prefalign.shapes.prompts import prompt_set
from prefalign.shapes.render import render
from prefalign.shapes.webdata import sample_quality, sample_web_example, to_uint8

PairBatch = tuple[
    list[str], torch.Tensor, torch.Tensor
]  # prompts, images_0, images_1 ([n, 3, H, W] in [0, 1])
ImageSource = Callable[[np.random.Generator, int, int], PairBatch]  # (rng, n, size) -> PairBatch


def web_pairs(rng: np.random.Generator, n: int, size: int = 32) -> PairBatch:
    """Two independent web-data images of the same freshly sampled prompt per pair."""
    prompts, first, second = [], [], []
    for _ in range(n):
        scene = sample_scene(rng)
        prompts.append(scene_to_prompt(scene))
        first.append(sample_web_example(rng, size, scene=scene).image)
        second.append(sample_web_example(rng, size, scene=scene).image)
    return prompts, torch.stack(first), torch.stack(second)


def quality_pairs(rng: np.random.Generator, n: int, size: int = 32) -> PairBatch:
    """Two faithful renders of the same prompt, each with independently drawn web image defects."""
    prompts, first, second = [], [], []
    for _ in range(n):
        scene = sample_scene(rng)
        prompts.append(scene_to_prompt(scene))
        first.append(render(scene, size, rng, sample_quality(rng)[0]))
        second.append(render(scene, size, rng, sample_quality(rng)[0]))
    return prompts, torch.stack(first), torch.stack(second)


def generator_pairs(
    generate: Callable[[list[str], np.random.Generator], torch.Tensor], prompts: Sequence[str]
) -> ImageSource:
    """An image source from any text-to-image sampler (e.g. the teacher): two samples of a random prompt."""
    if not prompts:
        raise PrefalignError("generator_pairs: the prompt list is empty; pass at least one prompt")

    def source(rng: np.random.Generator, n: int, size: int = 32) -> PairBatch:
        chosen = [prompts[int(i)] for i in rng.integers(len(prompts), size=n)]
        return chosen, generate(chosen, rng), generate(chosen, rng)

    return source


def teacher_pairs(rng: np.random.Generator, n: int, size: int = 32, teacher: str | None = None) -> PairBatch:
    """Two samples of a teacher pipeline directory (default: the shipped one; DDIM 25 steps, CFG 3, the demo's
    sampler) for random shapes-train prompts: on-policy pairs, the shapes analogue of Pick-a-Pic's pairs of the
    model's own generations."""
    generate = _teacher_sampler(teacher)
    return generator_pairs(lambda prompts, r: generate(prompts, r.integers(2**31, size=len(prompts)).tolist()),
                           prompt_set("train"))(rng, n, size)


@functools.cache
def _teacher_sampler(teacher: str | None) -> Callable:
    # Imported here: it loads diffusers, needed only when teacher pairs are made.
    from prefalign.shapes.generators import teacher_source

    return teacher_source(teacher)


IMAGE_SOURCES: dict[str, ImageSource] = {"web": web_pairs, "quality": quality_pairs, "teacher": teacher_pairs}


def preference_probability(s0: torch.Tensor, s1: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bradley–Terry P(image 0 preferred) = σ((s0 − s1) / T)."""
    if temperature <= 0:
        raise PrefalignError(f"temperature must be > 0 (got {temperature}); use a small value like 0.05")
    return torch.sigmoid((s0 - s1) / temperature)


def noiseless_labels(s0: torch.Tensor, s1: torch.Tensor, tie_margin: float) -> torch.Tensor:
    """label_0 of the noiseless preference: 1, 0, or 0.5 inside the tie band."""
    delta = s0 - s1
    return torch.where(delta.abs() < tie_margin, 0.5, (delta > 0).float())


def simulate_labels(
    s0: torch.Tensor, s1: torch.Tensor, temperature: float, tie_margin: float, rng: np.random.Generator
) -> torch.Tensor:
    """Noisy label_0 drawn from the Bradley–Terry model, 0.5 for ties (|Δ| < tie_margin)."""
    p = preference_probability(s0, s1, temperature)
    draws = torch.from_numpy(rng.random(len(p))).float() < p
    return torch.where((s0 - s1).abs() < tie_margin, 0.5, draws.float())


def label_noise_ceiling(s0: torch.Tensor, s1: torch.Tensor, temperature: float, tie_margin: float) -> float:
    """Expected accuracy of the noisy labels against the noiseless preference: mean σ(|Δ|/T) over non-ties."""
    delta = (s0 - s1).abs()
    keep = delta >= tie_margin
    if not bool(keep.any()):
        raise PrefalignError(f"label_noise_ceiling: every pair is a tie at tie_margin={tie_margin}; lower it")
    return float(torch.sigmoid(delta[keep] / temperature).mean())


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes) -> torch.Tensor:
    """PNG/JPEG bytes (a jpg_0 / jpg_1 cell) → float tensor [3, H, W] in [0, 1]."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class PreferenceDatasetInfo:
    """What `make_preference_dataset` wrote, and the numbers a reward-training report quotes."""

    path: str
    split: str
    n_pairs: int
    seed: int
    temperature: float
    tie_margin: float
    image_source: str
    tie_fraction: float
    label_noise_ceiling: float
    label_agreement: float  # realised agreement of the noisy labels with the noiseless ones (non-ties)


def make_preference_dataset(
    out_dir: str | Path,
    n_pairs: int,
    seed: int,
    temperature: float = 0.05,
    tie_margin: float = 0.02,
    image_source: str | ImageSource = "web",
    split: str = "train",
    size: int = 32,
    chunk: int = 256,
) -> PreferenceDatasetInfo:
    """Write `out_dir/{split}.parquet` and `out_dir/{split}.json` (both atomically); see the module docstring.

    Images come from `image_source` (a name in IMAGE_SOURCES or an `ImageSource`) with `default_rng(seed)`;
    labels use the separate stream `default_rng([seed, 1])`, so changing the temperature keeps the images.
    """
    if n_pairs < 1:
        raise PrefalignError(f"n_pairs must be ≥ 1 (got {n_pairs})")
    if isinstance(image_source, str):
        if image_source not in IMAGE_SOURCES:
            raise PrefalignError(
                f"image_source '{image_source}' is unknown; use one of {', '.join(IMAGE_SOURCES)}"
            )
        source_name, source = image_source, IMAGE_SOURCES[image_source]
    else:
        source_name, source = getattr(image_source, "__name__", "custom"), image_source
    image_rng, label_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    rows: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "oracle_0", "oracle_1")}
    for start in range(0, n_pairs, chunk):
        prompts, first, second = source(image_rng, min(chunk, n_pairs - start), size)
        rows["caption"] += prompts
        rows["jpg_0"] += [_png(x) for x in first]
        rows["jpg_1"] += [_png(x) for x in second]
        # Score the stored (8-bit) images so the saved oracle columns match what a reader decodes.
        rows["oracle_0"] += oracle(to_uint8(first).float() / 255, prompts).tolist()
        rows["oracle_1"] += oracle(to_uint8(second).float() / 255, prompts).tolist()
    s0, s1 = torch.tensor(rows["oracle_0"]), torch.tensor(rows["oracle_1"])
    label_0 = simulate_labels(s0, s1, temperature, tie_margin, label_rng)
    truth = noiseless_labels(s0, s1, tie_margin)
    frame = pd.DataFrame(rows)
    frame["label_0"], frame["label_1"] = label_0.numpy(), (1 - label_0).numpy()
    frame["true_label_0"] = truth.numpy()
    frame["model_0"] = frame["model_1"] = source_name
    decided = truth != 0.5
    info = PreferenceDatasetInfo(
        path=str(Path(out_dir) / f"{split}.parquet"),
        split=split,
        n_pairs=n_pairs,
        seed=seed,
        temperature=temperature,
        tie_margin=tie_margin,
        image_source=source_name,
        tie_fraction=float((~decided).float().mean()),
        label_noise_ceiling=label_noise_ceiling(s0, s1, temperature, tie_margin)
        if decided.any()
        else float("nan"),
        label_agreement=float((label_0[decided] == truth[decided]).float().mean())
        if decided.any()
        else float("nan"),
    )
    atomic_save(info.path, lambda p: frame.to_parquet(p, index=False))
    atomic_write_text(Path(out_dir) / f"{split}.json", json.dumps(asdict(info), indent=2) + "\n")
    return info


VALIDATION_SEED_OFFSET = 10_000  # as the `shapes:` data source's validation split (prefalign.train.preference_data)


def make_preference_splits(
    out_dir: str | Path,
    n_pairs: int,
    val_pairs: int,
    seed: int,
    temperature: float = 0.05,
    tie_margin: float = 0.02,
    image_source: str | ImageSource = "web",
) -> list[PreferenceDatasetInfo]:
    """`train` and (when `val_pairs` > 0) `validation` splits in `out_dir`, from independent seeds, so that
    `prefalign train-reward data.source=<out_dir>` finds both."""
    infos = [make_preference_dataset(out_dir, n_pairs, seed, temperature, tie_margin, image_source, "train")]
    if val_pairs > 0:
        infos.append(make_preference_dataset(out_dir, val_pairs, seed + VALIDATION_SEED_OFFSET, temperature,
                                             tie_margin, image_source, "validation"))
    return infos


def load_preference_pairs(path: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read a dataset written by `make_preference_dataset`: (captions, images_0, images_1, label_0)."""
    path = Path(path)
    if not path.is_file():
        raise PrefalignError(f"preference dataset {path} not found; create it with make_preference_dataset")
    frame = pd.read_parquet(path, columns=["caption", "jpg_0", "jpg_1", "label_0"])
    first = torch.stack([decode_image(b) for b in frame["jpg_0"]])
    second = torch.stack([decode_image(b) for b in frame["jpg_1"]])
    return (
        list(frame["caption"]),
        first,
        second,
        torch.tensor(frame["label_0"].to_numpy(), dtype=torch.float32),
    )


# One image of a given scene per image source, for ranked groups (k images of one prompt).
_GROUP_IMAGES: dict[str, Callable[[np.random.Generator, object, int], torch.Tensor]] = {
    "web": lambda rng, scene, size: sample_web_example(rng, size, scene=scene).image,
    "quality": lambda rng, scene, size: render(scene, size, rng, sample_quality(rng)[0]),
}


def simulate_ranking(scores: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Ranks (0 = best) of one Plackett–Luce draw with utilities s / T: the order of s / T + Gumbel noise. Any two
    items come out in the order i before j with the Bradley–Terry probability σ((s_i − s_j) / T)."""
    order = np.argsort(-(np.asarray(scores) / temperature + rng.gumbel(size=len(scores))))
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(len(scores))
    return ranks


def make_ranked_groups(
    out_dir: str | Path,
    n_groups: int,
    group_size: int,
    seed: int,
    temperature: float = 0.05,
    tie_margin: float = 0.02,
    image_source: str = "web",
    split: str = "train",
    size: int = 32,
) -> Path:
    """Write `n_groups` prompts with `group_size` images each, ranked by a simulated annotator, in the ranked-group
    format of `prefalign.train.preference_groups`: `out_dir/{split}.jsonl` (caption, images best first as paths
    of PNG files under `out_dir/images/`, and the evaluation-only `oracle` scores in the same order) and
    `out_dir/{split}.json` (the settings); returns the jsonl path.

    Rankings are `simulate_ranking` draws from the oracle scores, so every two images of a group are ordered with
    the pairs' Bradley–Terry probability σ((s_i − s_j) / T); `tie_margin` is recorded for evaluation (noiseless
    pairs closer than it count as ties). Images use `default_rng(seed)`, the rankings `default_rng([seed, 1])`.
    """
    if n_groups < 1 or group_size < 2 or temperature <= 0:
        raise PrefalignError(f"ranked groups need n_groups ≥ 1, group_size ≥ 2 and temperature > 0 (got "
                             f"{n_groups}, {group_size}, {temperature})")
    if image_source not in _GROUP_IMAGES:
        raise PrefalignError(f"image_source '{image_source}' is unknown for ranked groups; use one of "
                             f"{', '.join(_GROUP_IMAGES)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    image_rng, rank_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    lines = []
    for i in range(n_groups):
        scene = sample_scene(image_rng)
        prompt = scene_to_prompt(scene)
        images = torch.stack([_GROUP_IMAGES[image_source](image_rng, scene, size) for _ in range(group_size)])
        scores = oracle(to_uint8(images).float() / 255, [prompt] * group_size)  # of the stored 8-bit images
        best_first = np.argsort(simulate_ranking(scores.numpy(), temperature, rank_rng))
        names = [f"images/{split}-{i:06d}-{place}.png" for place in range(group_size)]
        for name, j in zip(names, best_first, strict=True):
            (out_dir / name).write_bytes(_png(images[j]))
        lines.append(json.dumps({"caption": prompt, "images": names, "oracle": scores[best_first].tolist()}))
    path = out_dir / f"{split}.jsonl"
    settings = {"path": str(path), "split": split, "n_groups": n_groups, "group_size": group_size, "seed": seed,
                "temperature": temperature, "tie_margin": tie_margin, "image_source": image_source}
    atomic_write_text(path, "\n".join(lines) + "\n")  # last: a run killed before it leaves no dataset
    atomic_write_text(out_dir / f"{split}.json", json.dumps(settings, indent=2) + "\n")
    return path


def make_ranked_splits(
    out_dir: str | Path,
    n_groups: int,
    val_groups: int,
    group_size: int,
    seed: int,
    temperature: float = 0.05,
    tie_margin: float = 0.02,
    image_source: str = "web",
) -> list[Path]:
    """`train` and (when `val_groups` > 0) `validation` ranked groups in `out_dir`, as `make_preference_splits`,
    so that `prefalign train-reward loss.kind=plackett_luce data.source=<out_dir>` finds both."""
    paths = [make_ranked_groups(out_dir, n_groups, group_size, seed, temperature, tie_margin, image_source)]
    if val_groups > 0:
        paths.append(make_ranked_groups(out_dir, val_groups, group_size, seed + VALIDATION_SEED_OFFSET, temperature,
                                        tie_margin, image_source, "validation"))
    return paths
