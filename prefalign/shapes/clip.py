"""shapes-clip: a small CLIP-style contrastive image–text model for the shapes world.

Architecture (Radford et al. 2021, CLIP, scaled down): a 4-layer CNN image tower whose 4×4 feature map is
flattened (so left/right/above/below survive pooling) and projected to the joint space, and a 2-layer
Transformer text tower over the grammar's word vocabulary that reads the embedding at the EOS token (as
CLIP's text encoder does). Both embeddings are L2-normalised; training minimises the symmetric InfoNCE loss
with a learned temperature (CLIP Fig. 3 pseudocode). Training data are web-data pairs arranged as "twins":
each scene comes with a one-attribute variant (count, colour, shape, relation, size or background), so every
batch holds hard negatives.

The shipped checkpoint (prefalign/assets/shapes_clip/) is reproduced by
    OMP_NUM_THREADS=1 python -m prefalign.shapes.clip --out prefalign/assets/shapes_clip
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prefalign.errors import PrefalignError
from prefalign.io import atomic_save, atomic_write_text
from prefalign.shapes.grammar import (
    Scene,
    make_prompt_sets,
    parse_prompt,
    sample_scene,
    scene_to_prompt,
    vocabulary,
)
from prefalign.shapes.oracle import oracle
from prefalign.shapes.render import render
from prefalign.shapes.webdata import SCENE_DEFECTS, corrupt_scene, sample_web_example, to_uint8

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "shapes_clip"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


@dataclass(frozen=True)
class ShapesCLIPConfig:
    embed_dim: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 96)  # conv widths; every layer after the first halves H and W
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 20
    image_size: int = 32


class WordTokenizer:
    """Whitespace tokenizer over the shapes grammar vocabulary: <bos> words <eos>, padded with <pad>."""

    def __init__(self, context_length: int) -> None:
        self.words = [*SPECIAL_TOKENS, *vocabulary()]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.context_length = context_length

    def __len__(self) -> int:
        return len(self.words)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = torch.zeros(len(prompts), self.context_length, dtype=torch.long)
        unk = self.index["<unk>"]
        for row, prompt in enumerate(prompts):
            words = prompt.lower().replace(",", " ").replace(".", " ").split()[: self.context_length - 2]
            ids = [self.index["<bos>"], *(self.index.get(w, unk) for w in words), self.index["<eos>"]]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens


class ShapesCLIP(nn.Module):
    """Dual encoder: `encode_image` ([B, 3, H, W] in [0, 1]) and `encode_text` (prompts) → unit vectors."""

    def __init__(self, config: ShapesCLIPConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ShapesCLIPConfig()
        self.tokenizer = WordTokenizer(config.context_length)
        layers: list[nn.Module] = []
        in_ch = 3
        for i, ch in enumerate(config.channels):
            layers += [
                nn.Conv2d(in_ch, ch, 3, stride=1 if i == 0 else 2, padding=1),
                nn.GroupNorm(8, ch),
                nn.GELU(),
            ]
            in_ch = ch
        self.image_tower = nn.Sequential(*layers)
        side = config.image_size // 2 ** (len(config.channels) - 1)
        self.image_proj = nn.Linear(in_ch * side * side, config.embed_dim)
        self.token_embedding = nn.Embedding(len(self.tokenizer), config.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, config.text_width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            config.text_width,
            config.text_heads,
            2 * config.text_width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.text_tower = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(config.text_width)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        features = self.image_tower((images - 0.5) / 0.25)
        return F.normalize(self.image_proj(features.flatten(1)), dim=-1)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.positional_embedding.device)
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.text_tower(x, src_key_padding_mask=tokens == 0)
        eos = (tokens == self.tokenizer.index["<eos>"]).float().argmax(1)
        x = self.text_norm(x[torch.arange(len(tokens)), eos])
        return F.normalize(self.text_proj(x), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each (image, prompt) pair: [B]."""
        return (self.encode_image(images) * self.encode_text(prompts)).sum(-1)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (CLIP, Fig. 3); the scale is clamped at 100 as in CLIP."""
    logits = logit_scale.clamp(max=math.log(100)).exp() * image_emb @ text_emb.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def variant_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """A one-attribute variant of `scene` (a random applicable scene defect from the web data)."""
    while True:
        twin = corrupt_scene(scene, SCENE_DEFECTS[int(rng.integers(len(SCENE_DEFECTS)))], rng)
        if twin is not None and scene_to_prompt(twin) != scene_to_prompt(scene):
            return twin


def make_twin_dataset(n_pairs: int, seed: int, size: int = 32) -> tuple[list[str], torch.Tensor]:
    """2·n_pairs web examples; items 2i and 2i+1 are a scene and a one-attribute variant (hard negatives)."""
    prompts: list[str] = []
    images = torch.empty(2 * n_pairs, 3, size, size, dtype=torch.uint8)
    for i in range(n_pairs):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng)
        for j, s in enumerate((scene, variant_scene(scene, rng))):
            sample = sample_web_example(rng, size, scene=s)
            prompts.append(sample.prompt)
            images[2 * i + j] = to_uint8(sample.image)
    return prompts, images


def lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier: linear warm-up over min(50, steps / 10) steps, then cosine decay to 0."""
    warmup = max(1, min(50, steps // 10))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def twin_batch(n_pairs: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices of `batch_size // 2` random twin pairs of `make_twin_dataset`, both items of each."""
    twins = torch.randperm(n_pairs, generator=generator)[: batch_size // 2]
    return torch.stack([2 * twins, 2 * twins + 1], 1).flatten()


def train_shapes_clip(
    steps: int = 800,
    seed: int = 0,
    out_dir: str | Path | None = None,
    batch_size: int = 128,
    n_pairs: int = 6000,
    lr: float = 2e-3,
    config: ShapesCLIPConfig | None = None,
) -> tuple[ShapesCLIP, dict]:
    """Train shapes-clip from scratch (AdamW, linear warm-up, cosine decay); save it when `out_dir` is set.

    Deterministic for a given seed, torch version and thread count. Returns (model in eval mode, summary).
    """
    start, start_cpu = time.time(), time.process_time()
    torch.manual_seed(seed)
    prompts, images = make_twin_dataset(n_pairs, seed)
    model = ShapesCLIP(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        idx = twin_batch(n_pairs, batch_size, generator)
        batch = images[idx].float() / 255.0
        loss = clip_loss(
            model.encode_image(batch), model.encode_text([prompts[i] for i in idx]), model.logit_scale
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    summary = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "n_pairs": n_pairs,
        "lr": lr,
        "final_loss": float(np.mean(losses[-50:])) if losses else math.nan,
        "train_seconds": time.time() - start,
        "train_cpu_seconds": time.process_time() - start_cpu,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    if out_dir is not None:
        save_shapes_clip(model, out_dir, summary)
    return model, summary


def save_shapes_clip(model: ShapesCLIP, out_dir: str | Path, summary: dict | None = None) -> Path:
    """Write model.safetensors (float16, ~0.5 MB) and config.json into `out_dir`, atomically."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_save(out_dir / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    payload = {"config": asdict(model.config), "training": summary or {}}
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")
    return out_dir


def load_shapes_clip(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ShapesCLIP:
    """Load a saved shapes-clip (default: the shipped checkpoint) strictly, in eval mode."""
    folder = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    weights, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not config_path.is_file():
        raise PrefalignError(
            f"shapes-clip checkpoint not found in {folder} (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "recreate it with: python -m prefalign.shapes.clip --out prefalign/assets/shapes_clip"
        )
    try:
        raw = json.loads(config_path.read_text())["config"]
        model = ShapesCLIP(ShapesCLIPConfig(**{**raw, "channels": tuple(raw["channels"])}))
    except (ValueError, KeyError, TypeError) as err:  # JSON syntax, a missing or unknown field
        raise PrefalignError(f"shapes-clip checkpoint {config_path} is not a shapes-clip config "
                             f"({type(err).__name__}: {err}); recreate it with `prefalign shapes train-clip`") from None
    try:
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:  # not safetensors, or another model's
        reason = str(err).splitlines()[0]
        raise PrefalignError(f"shapes-clip weights {weights} do not load ({reason}); recreate them with "
                             "`prefalign shapes train-clip`") from None
    return model.to(device=device, dtype=dtype).eval()


def clip_score(model: ShapesCLIP, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """CLIPScore convention of torchmetrics: 100 · max(cos(image, text), 0), per pair."""
    return 100 * model(images, prompts).clamp_min(0)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@torch.no_grad()
def evaluate_shapes_clip(model: ShapesCLIP, n_prompts: int = 200, group: int = 5, seed: int = 1) -> dict:
    """Retrieval and oracle agreement of shapes-clip on the first `n_prompts` validation prompts
    (prompts/shapes_val.txt).

    retrieval_i2t / _t2i: top-1 accuracy among the `n_prompts` prompts, on ideal renders. twin_accuracy:
    share of ideal renders whose own prompt beats a one-attribute variant. For `group` web samples of each
    prompt: spearman_oracle (rank correlation of the CLIPScore with the oracle over all samples),
    spearman_within_prompt (the same inside each prompt's group, averaged) and pair_accuracy (agreement with
    the oracle's preference on within-prompt pairs whose oracle scores differ by ≥ 0.02, the default tie
    margin of the simulated labels).
    """
    rng = np.random.default_rng(seed)
    prompts = make_prompt_sets(n_val=n_prompts)[1]
    scenes = [parse_prompt(p) for p in prompts]
    image_emb = model.encode_image(torch.stack([render(s, 32, rng) for s in scenes]))
    sims = image_emb @ model.encode_text(prompts).T
    target = torch.arange(n_prompts)
    twin_cos = (image_emb * model.encode_text([scene_to_prompt(variant_scene(s, rng)) for s in scenes])).sum(
        -1
    )
    web_prompts = [p for p in prompts for _ in range(group)]
    web = torch.stack([sample_web_example(rng, 32, scene=parse_prompt(p)).image for p in web_prompts])
    scores, truth = clip_score(model, web, web_prompts), oracle(web, web_prompts)
    by_prompt, truth_by_prompt = scores.view(-1, group), truth.view(-1, group)
    within = [_spearman(a, b) for a, b in zip(by_prompt, truth_by_prompt, strict=True)]
    d_clip = by_prompt[:, :, None] - by_prompt[:, None, :]
    d_truth = truth_by_prompt[:, :, None] - truth_by_prompt[:, None, :]
    pairs = torch.ones(group, group, dtype=torch.bool).triu(1) & (d_truth.abs() >= 0.02)
    return {
        "retrieval_i2t": float((sims.argmax(1) == target).float().mean()),
        "retrieval_t2i": float((sims.argmax(0) == target).float().mean()),
        "twin_accuracy": float((sims.diagonal() > twin_cos).float().mean()),
        "spearman_oracle": _spearman(scores, truth),
        "spearman_within_prompt": float(np.nanmean(within)),
        "pair_accuracy": float(((d_clip > 0) == (d_truth > 0))[pairs].float().mean()),
        "n_prompts": n_prompts,
        "n_web": len(web_prompts),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m prefalign.shapes.clip --out DIR`: train, evaluate and save shapes-clip."""
    parser = argparse.ArgumentParser(description="Train the shapes-clip reward model.")
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, summary = train_shapes_clip(args.steps, args.seed)
    save_shapes_clip(model, args.out, summary)
    summary["eval"] = evaluate_shapes_clip(load_shapes_clip(args.out))  # the stored float16 weights
    save_shapes_clip(model, args.out, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
