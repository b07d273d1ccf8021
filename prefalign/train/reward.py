"""`prefalign train-reward`: train a preference scorer on pairs or ranked groups, optionally step-aware (SPO's SPM).

What trains (`model.*`, scorers from `prefalign.rewards.trainable`): a CLIP-style scorer fully or through LoRA
(PickScore / HPS-like), a head on frozen embeddings (aesthetic-style), or, with `model.time_conditioned`, SPO's
step-aware preference model (Liang et al. 2024; RockeyCoss/SPO `step_aware_preference_model/`). The step-aware
model sees each pair noised to one random t ~ U{0..T−1} with the *same* noise for both images, denoised in one
step by the frozen base model with CFG, decoded, and scored together with t (`noised_x0`,
`trainer/tasks/spm_task.py::get_noised_imgs`); the k images of a ranked group share one t and noise likewise.

Loss (`loss.*`): PickScore's soft-label cross-entropy by default, Bradley–Terry without ties, or Bradley–Terry
with ties; or, with `loss.kind=plackett_luce`, the Plackett–Luce likelihood of ranked groups (k images per
prompt, ties allowed; the format of `prefalign.train.preference_groups`; `loss.top_k` places, 1 = HPSv2's
best-of-group loss); fixed or learnable temperature; per-prompt 1/n weights (PickScore).

The loop is `prefalign.train.loop.train_loop` (optimizer, schedule, clipping, EMA, NaN guard, exact resume) with
the scorer and its loss as the trainable. Files: metrics.csv/png (training loss and temperature every
`train.log_every` steps), eval.csv/png (at step 0, every `eval.every` steps and at the end, on the validation
split at the timestep buckets `eval.timesteps`, fixed noise per row and bucket: pairwise accuracy, over every two
images of a group, against the dataset labels (`acc*`) and, for the shapes world, against the oracle's noiseless
preference (`acc_true*`), ties in the label excluded from both; and the validation loss), summary.json (with the
label-noise ceiling of the validation pairs when the data carry oracle scores) and the scorer directory `scorer/`
(loads with `prefalign.rewards.load("step-aware" or "trained", checkpoint=DIR)`). Compute: `fb_calls` counts
scored images, `fwd_calls` the base model's denoiser rows for the x̂0 inputs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import torch

from prefalign.config import deep_merge
from prefalign.errors import PrefalignError
from prefalign.io import atomic_path, atomic_write_text
from prefalign.rewards.step_aware import predict_x0_images
from prefalign.runs import prepare_run_dir
from prefalign.train.common import MetricsLog
from prefalign.train.loop import Evaluation, Method, MicroBatch, train_loop
from prefalign.train.policy import load_base_model
from prefalign.train.preference_data import (
    SHAPES_SPLIT_SEED_OFFSET,
    PairBatch,
    PreferenceData,
    load_preference_data,
)
from prefalign.train.preference_groups import GroupBatch, GroupData, load_group_data
from prefalign.train.preference_losses import pairwise_accuracy
from prefalign.train.reward_scorer import ScorerAndLoss, ScorerTrainable, make_loss, make_scorer

DEFAULTS: dict = {
    "seed": 0,
    "device": "auto",
    "out": "runs/train-reward",
    "resume": False,
    "log": {"with": None, "project": None},  # experiment tracker: tensorboard | wandb (train.common.make_accelerator)
    "data": {
        "source": "shapes:web?n=4000&seed=0",  # see prefalign/train/preference_data.py and preference_groups.py
        "split": "train",
        "val_source": None,  # None: data.source
        "val_split": "validation",  # None: hold out data.val_fraction of the training captions
        "val_fraction": 0.05,
        "resolution": None,  # resize + centre-crop every image at load time (needed for mixed sizes)
        "limit": None,
        "val_limit": 500,
    },
    "model": {
        "kind": "clip",  # clip (PickScore/HPS-like) | head (MLP on frozen embeddings)
        "backbone": "shapes-clip",  # shapes-clip | open_clip:ARCH | hf-clip
        "checkpoint": None,  # the backbone's base weights (default per backbone, see build_scorer)
        "init_from": None,  # a trained scorer directory to start from (SPO starts its step-aware model at PickScore)
        "time_conditioned": True,  # SPO's step-aware model: adaLN timestep conditioning, noised x̂0 inputs
        "train": None,  # full | lora | frozen (only head/adaLN train); None: full for clip, frozen for head
        "lora_rank": 8,
        "lora_alpha": None,
        "options": {},  # backbone options, e.g. with_text for heads, pipeline for open_clip
    },
    "step_aware": {
        "base_model": "shapes-teacher",  # predicts x̂0; shapes-teacher[:DIR] or a pipeline directory; None: clean
        "guidance": 3.0,  # CFG of the x̂0 prediction (SPO: 5.0 with SD1.5/SDXL; the shapes demo samples at 3)
    },
    "loss": {
        # soft (PickScore, ties as 0.5/0.5) | bt (ties dropped) | btt (Bradley–Terry with ties) on pairs;
        # plackett_luce on ranked groups (data in the group format, see prefalign/train/preference_groups.py)
        "kind": "soft",
        "top_k": None,  # plackett_luce: the first top_k places of each ranking (None: all; 1: best of the group)
        "temperature": 1.0,
        "learn_temperature": False,
        "tie_theta": 5.0,
        "learn_tie_theta": False,
        "per_prompt_weighting": True,  # PickScore's 1/n per prompt
    },
    "train": {
        "steps": 600,
        "batch_size": 32,  # pairs (or groups) per process and micro-batch
        "grad_accum": 1,
        "lr": 3e-4,
        "warmup_steps": 30,
        "lr_schedule": "cosine",
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "mixed_precision": "no",  # no | fp16 | bf16
        "gradient_checkpointing": False,  # ViT backbones
        "ema_decay": None,
        "log_every": 10,
        "checkpoint_every": 100,
    },
    "eval": {
        "every": 100,  # evaluate at step 0, every N steps and at the end; 0 = never
        "batch_size": 128,
        "timesteps": [0, 250, 500, 750, 950],  # used when a base model is set; otherwise clean images only
        "noise_seed": 1,
        "cache_max_bytes": 2**30,  # keep the validation x̂0 images in memory below this size
    },
}

# `prefalign demo`: SPO's recipe in two short stages (about a minute on a 2-core CPU): a clean preference model
# (PickScore's role), then the step-aware model initialised from it. Both evaluate on the same held-out pairs.
DEMO_PAIRS: dict = {"train": 1000, "validation": 100}  # simulated web-data pairs, written once for both stages
DEMO_STAGES: dict = {
    "clean": {"model": {"time_conditioned": False}, "step_aware": {"base_model": None},
              "train": {"steps": 150, "batch_size": 32, "lr": 1e-3, "warmup_steps": 10, "checkpoint_every": 150},
              "eval": {"every": 150}},
    "step_aware": {"train": {"steps": 20, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 20},
                   "eval": {"every": 20, "timesteps": [0, 500, 950]}},
}


def noised_x0(
    base_model, images: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prompts: list[str], guidance: float
) -> torch.Tensor:
    """SPO's SPM input transform (`spm_task.py::get_noised_imgs`): encode images (VAE mode, or 2x − 1 in pixel
    space), noise them to x_t = α_t x_0 + σ_t ε, predict x̂0 with one CFG call of the base model, decode to [0, 1].

    `noise` has the shape of x_0 ([B, C, H/f, W/f], see `x0_shape`); pass the same noise for the two images of a
    pair, as SPO does.
    """
    with torch.no_grad():
        x0 = base_model.encode_images(images.to(base_model.device, base_model.dtype), sample=False)
        t = t.to(x0.device)
        x_t = base_model.schedule.add_noise(x0, noise.to(x0), t)
        return predict_x0_images(base_model, x_t, t, prompts, guidance)


def x0_shape(base_model, images: torch.Tensor) -> tuple[int, int, int]:
    """(C, H, W) of the base model's x_0 for images [B, 3, H, W]."""
    f = base_model.vae_scale_factor
    return base_model.sample_shape[0], images.shape[-2] // f, images.shape[-1] // f


def _load_data(config: dict, log: Callable[[str], None]
               ) -> tuple[PreferenceData | GroupData, PreferenceData | GroupData]:
    data = config["data"]
    kwargs = {"resolution": data["resolution"], "log": log}
    load = load_group_data if config["loss"]["kind"] == "plackett_luce" else load_preference_data
    train = load(data["source"], data["split"], limit=data["limit"], **kwargs)
    if data["val_split"] is None:
        train, val = train.split_by_caption(data["val_fraction"], config["seed"])
        log(f"[data] held out {len(val)} rows ({len(set(val.captions))} captions) for validation")
    else:
        source = data["val_source"] or data["source"]
        if data["val_source"] is None and Path(source).is_file():
            raise PrefalignError(f"data.source {source} is one file: set data.val_source to a validation file, "
                                 "or data.val_split=null to hold out data.val_fraction of its captions")
        val = load(source, data["val_split"], limit=data["val_limit"], **kwargs)
    if data["val_limit"] is not None and len(val) > data["val_limit"]:
        val = val.subset(range(data["val_limit"]))
    return train, val


def _draw(data: PreferenceData | GroupData, base, draw: int, batch_size: int, accelerator, seed: int,
          generator: torch.Generator) -> tuple[PairBatch | GroupBatch, torch.Tensor | None, torch.Tensor | None]:
    """This process's share of global batch number `draw`, and for step-aware training (a base model given) each
    pair's (group's) t ~ U{0..T−1} and noise from `generator`. The whole global batch is drawn on every process,
    and each takes its slice, so a run gives the same batches on any number of processes."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    batch = data.batch(_batch_indices(len(data), draw, batch_size * world, seed)[mine].tolist())
    if base is None:
        return batch, None, None
    t = torch.randint(0, base.schedule.num_timesteps, (batch_size * world,), generator=generator)[mine]
    noise = torch.randn((batch_size * world, *x0_shape(base, batch.candidates)), generator=generator)[mine]
    return batch, t, noise


def _batch_indices(n: int, draw: int, size: int, seed: int) -> torch.Tensor:
    """Row indices of global batch number `draw`: consecutive slices of one seeded permutation per epoch, so the
    data order is a function of (seed, draw) and a resumed run continues it exactly."""
    positions = torch.arange(draw * size, (draw + 1) * size)
    epochs = positions // n
    out = torch.empty(size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        here = epochs == epoch
        out[here] = perm[positions[here] % n]
    return out


def _scorer_inputs(base, candidates: torch.Tensor, captions: list[str], t: torch.Tensor | None,
                   noise: torch.Tensor | None, guidance: float) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """(images, prompts, t) for one scorer call on [B, K] candidates, candidate-major (every row's first image, then
    every second, ...): the clean images, or each noised with its row's t and noise, denoised by the base model
    (`noised_x0`)."""
    k = candidates.shape[1]
    images, prompts = candidates.transpose(0, 1).flatten(0, 1), list(captions) * k
    if t is None:
        return images, prompts, None
    t_k = t.repeat(k)
    return noised_x0(base, images, t_k, noise.repeat(k, *[1] * (noise.ndim - 1)), prompts, guidance), prompts, t_k


def _candidate_scores(scorer, base, batch: PairBatch | GroupBatch, t: torch.Tensor | None, noise: torch.Tensor | None,
                      guidance: float, device: torch.device) -> torch.Tensor:
    """Scores [B, K] of a batch's candidates in one scorer call (see `_scorer_inputs`)."""
    candidates = batch.candidates
    images, prompts, t_k = _scorer_inputs(base, candidates.to(device), batch.captions, t, noise, guidance)
    out = scorer(images.to(device), prompts, None if t_k is None else t_k.to(device))
    return out.view(candidates.shape[1], -1).T


def _pair_scores(scorer, base, batch: PairBatch, t: torch.Tensor | None, noise: torch.Tensor | None,
                 guidance: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (r_0, r_1) of a batch of pairs; both images of a pair share t and noise."""
    return _candidate_scores(scorer, base, batch, t, noise, guidance, device).unbind(1)


def _batch_loss(scorer, loss_fn, base, batch: PairBatch | GroupBatch, t: torch.Tensor | None,
                noise: torch.Tensor | None, config: dict, device: torch.device) -> torch.Tensor:
    weight = batch.weight.to(device) if config["loss"]["per_prompt_weighting"] else None
    guidance = config["step_aware"]["guidance"]
    if isinstance(batch, GroupBatch):
        scores = _candidate_scores(scorer, base, batch, t, noise, guidance, device)
        return loss_fn(scores.float(), batch.ranks.to(device), weight)
    r0, r1 = _pair_scores(scorer, base, batch, t, noise, guidance, device)
    return loss_fn(r0.float(), r1.float(), batch.label_0.to(device), weight)


class _Evaluator:
    """Validation accuracy per timestep bucket on this process's share of the rows (pairs or groups), gathered
    across processes. Each row has fixed noise per bucket (seeded by its index and the bucket); the decoded x̂0
    images are cached."""

    def __init__(self, val: PreferenceData | GroupData, base, config: dict, accelerator) -> None:
        ev = config["eval"]
        self.val, self.base, self.accelerator, self.batch_size = val, base, accelerator, ev["batch_size"]
        self.guidance, self.seed = config["step_aware"]["guidance"], ev["noise_seed"]
        self.buckets: list[int | None] = list(ev["timesteps"]) if base is not None else [None]
        rank, world = accelerator.process_index, accelerator.num_processes
        per_process = math.ceil(len(val) / world)
        # Pad this process's share to equal length (gather needs it) by repeating its last row.
        rows = list(range(rank, len(val), world)) or [len(val) - 1]
        self.rows = (rows + rows[-1:] * per_process)[:per_process]
        pixels = len(val) * len(self.buckets) * val.batch([0]).candidates.numel() * 4
        self.cache: dict[tuple, torch.Tensor] | None = {} if pixels <= ev["cache_max_bytes"] else None

    def _inputs(self, batch: PairBatch | GroupBatch, bucket: int | None, start: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (bucket, start)
        if self.cache is not None and key in self.cache:
            images = self.cache[key]
        else:
            t = noise = None
            if bucket is not None:
                shape = x0_shape(self.base, batch.candidates)
                noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + int(i) * 1000 + bucket)) for i in batch.index])
                t = torch.full((len(batch.captions),), bucket)
            images = _scorer_inputs(self.base, batch.candidates, batch.captions, t, noise, self.guidance)[0].cpu()
        if self.cache is not None:
            self.cache[key] = images
        return images, None if bucket is None else torch.full((len(images),), bucket)

    @torch.no_grad()
    def __call__(self, model: ScorerAndLoss) -> dict[str, float]:
        """The eval.csv row of `model` (in eval mode), the same on every process."""
        device, row, loss_fn = self.accelerator.device, {}, model.loss
        totals = {"acc": [], "acc_true": [], "val_loss": []}
        pair_rows, first, second, labels = self.val.pairs()  # every two candidates of a group, or the pairs
        for bucket in self.buckets:
            scores = []
            for start in range(0, len(self.rows), self.batch_size):
                batch = self.val.batch(self.rows[start:start + self.batch_size])
                images, t = self._inputs(batch, bucket, start)
                k = len(images) // len(batch.captions)
                with self.accelerator.autocast():
                    out = model(images.to(device), batch.captions * k, None if t is None else t.to(device))
                scores.append(out.float().view(k, -1).T)
            gathered = self.accelerator.gather(torch.cat(scores)).cpu()  # [world * share, K], rows interleaved
            index = self.accelerator.gather(torch.tensor(self.rows, device=device)).cpu()
            r = torch.zeros(len(self.val), gathered.shape[1])
            r[index] = gathered
            name = _bucket("clean" if bucket is None else bucket)
            r0, r1 = r[pair_rows, first], r[pair_rows, second]
            row[f"acc_{name}"] = pairwise_accuracy(r0, r1, labels["label_0"])
            loss = loss_fn(r, self.val.ranks) if isinstance(self.val, GroupData) else loss_fn(r0, r1, labels["label_0"])
            row[f"val_loss_{name}"] = float(loss)
            totals["acc"].append(row[f"acc_{name}"])
            totals["val_loss"].append(row[f"val_loss_{name}"])
            if "true_label_0" in labels:
                row[f"acc_true_{name}"] = pairwise_accuracy(r0, r1, labels["true_label_0"])
                totals["acc_true"].append(row[f"acc_true_{name}"])
        # Every bucket has the same pairs, so the pooled accuracy is the mean over buckets.
        return {**{k: sum(v) / len(v) for k, v in totals.items() if v}, **row}


def _peak_memory_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by torch on CUDA, else the process's peak resident set size (Unix)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def label_noise_ceiling_of(data: PreferenceData | GroupData) -> float | None:
    """The label-noise ceiling (prefalign.shapes.labels.label_noise_ceiling) of pairs that carry oracle scores; for
    ranked groups, of every two images of a group (a Plackett–Luce ranking orders them with the pairs' σ(Δ/T))."""
    from prefalign.shapes.labels import label_noise_ceiling

    columns = data.pairs()[3]
    if not {"oracle_0", "oracle_1"} <= set(columns) or "temperature" not in data.meta:
        return None
    return label_noise_ceiling(columns["oracle_0"], columns["oracle_1"], data.meta["temperature"],
                               data.meta["tie_margin"])


def plot_accuracy(csv_path: Path, png_path: Path, ceiling: float | None = None) -> None:
    """eval.png: the validation loss, and validation accuracy per timestep bucket against the labels and (shapes world)
    against the noiseless preference, with the label-noise ceiling as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.read_csv(csv_path)
    buckets = [c.removeprefix("acc_") for c in frame if c.startswith("acc_") and not c.startswith("acc_true")]
    panels = [("validation loss", {f"val_loss_{b}": b for b in buckets}),
              ("accuracy vs labels", {f"acc_{b}": b for b in buckets}),
              ("accuracy vs noiseless preference", {f"acc_true_{b}": b for b in buckets if f"acc_true_{b}" in frame})]
    panels = [(title, columns) for title, columns in panels if columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, columns) in zip(axes[0], panels, strict=True):
        for column, label in columns.items():
            ax.plot(frame["step"], frame[column], marker="o", markersize=3, label=label)
        if ceiling is not None and title.startswith("accuracy"):
            ax.axhline(ceiling, color="gray", linestyle="--", label="label-noise ceiling")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


class _RewardRun:
    """One `train-reward` run on `train_loop`: the scorer (`load`), the data, base model, method and evaluation
    (`setup`), and summary.json, written with the scorer."""

    def __init__(self, config: dict, run_dir: Path) -> None:
        self.config, self.run_dir, self.steps_run = config, run_dir, 0
        self.clock, self.cpu = time.perf_counter(), time.process_time()

    def load(self, device: torch.device) -> ScorerTrainable:
        self.device = device
        return ScorerTrainable(*make_scorer(self.config, device), make_loss(self.config["loss"]).to(device),
                               self.scorer_meta)

    def setup(self, model: ScorerTrainable, accelerator, say: Callable[[str], None]) -> tuple[Method, Evaluation]:
        self.train_data, self.val_data = _load_data(self.config, say)
        self.ceiling = label_noise_ceiling_of(self.val_data)
        step_cfg = self.config["step_aware"]
        base = load_base_model(step_cfg["base_model"], accelerator.device) if step_cfg["base_model"] else None
        evaluation = Evaluation(_Evaluator(self.val_data, base, self.config, accelerator),
                                lambda csv, png: plot_accuracy(csv, png, self.ceiling), ["acc", "acc_true", "val_loss"])
        return self.method(model, base, accelerator), evaluation

    def method(self, model: ScorerTrainable, base, accelerator) -> Method:
        """The preference loss: `train.grad_accum` micro-batches of `train.batch_size` pairs (groups) per process;
        step-aware training noises each to a t and noise drawn from the step's generator."""
        config, data, loss_fn = self.config, self.train_data, model.module.loss
        tr, guidance = config["train"], config["step_aware"]["guidance"]
        accum, batch_size = int(tr["grad_accum"]), int(tr["batch_size"])
        noised = base if config["model"]["time_conditioned"] else None
        calls_per_image = 1 if guidance == 1 else 2  # the base model's x̂0 with CFG

        def micro_batches(step: int, generator: torch.Generator) -> Iterator[MicroBatch]:
            self.steps_run += 1
            for micro in range(accum):
                batch, t, noise = _draw(data, noised, step * accum + micro, batch_size, accelerator, config["seed"],
                                        generator)
                loss = _batch_loss(model.model, loss_fn, base, batch, t, noise, config, accelerator.device)
                images = batch.candidates.shape[0] * batch.candidates.shape[1]
                stats = {"loss": float(accelerator.reduce(loss.detach(), "mean")),  # of the whole global batch
                         "temperature": loss_fn.temperature}
                yield MicroBatch(loss / accum, stats, fb_rows=images,
                                 fwd_rows=0 if t is None else images * calls_per_image)

        return Method("train-reward", "Reward model", micro_batches, ["loss", "temperature"])

    def scorer_meta(self) -> dict:
        """What the scorer directory records (the base model the step-aware reward loads, and the summary), also
        written to summary.json."""
        evals, steps = self.run_dir / "eval.csv", self.config["train"]["steps"]
        summary = {
            "steps": steps, "data": self.config["data"]["source"], "train_pairs": len(self.train_data),
            "val_pairs": len(self.val_data),
            "skipped_rows": {"train": self.train_data.skipped, "validation": self.val_data.skipped},
            "label_noise_ceiling": self.ceiling, "final": (MetricsLog(evals).rows or [{}])[-1],
            "steps_run": self.steps_run,  # by this invocation (a resumed run continues an earlier one)
            "steps_per_second": self.steps_run / max(time.perf_counter() - self.clock, 1e-9),
            "train_cpu_seconds": time.process_time() - self.cpu,  # this process, evaluations included
            "peak_memory_mb": _peak_memory_mb(self.device),
        }
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        step_cfg = self.config["step_aware"]
        return {"base_model": step_cfg["base_model"], "guidance": step_cfg["guidance"], "training": summary}


def train(config: dict, run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Train a preference scorer from `config` (see DEFAULTS) in `run_dir`; returns the scorer directory.

    Resumable (`resume`: checkpoint.pt every `train.checkpoint_every` steps); stops at the first non-finite loss
    naming the step and the last good checkpoint.
    """
    if config["model"]["time_conditioned"] and not config["step_aware"]["base_model"]:
        raise PrefalignError("model.time_conditioned needs step_aware.base_model (e.g. shapes-teacher) to make "
                             "the noised x̂0 inputs; or set model.time_conditioned=false")
    run = _RewardRun(config, run_dir)
    out = train_loop(config, run_dir, run.load, run.setup, log, output="scorer")
    log(f"[train-reward] scorer saved to {out}" + (f"; label-noise ceiling {run.ceiling:.3f}" if run.ceiling else ""))
    return out


def demo_stage(ctx) -> None:
    """`prefalign demo` stage "reward" (DEMO_STAGES) on simulated shapes labels, with the demo's teacher as the base
    model, into `ctx.run_dir/reward/{clean,step_aware}/`. Sets ctx.artifacts["step-aware"] to the step-aware scorer
    and ctx.results["reward"] to the held-out accuracy of both models (per timestep bucket for the step-aware one)
    next to the label-noise ceiling. A rerun resumes the finished runs instead of training again."""
    from prefalign.shapes.labels import make_preference_dataset

    teacher, seed, data = ctx.config["teacher"], ctx.config["seed"], ctx.run_dir / "reward" / "data"
    for split, n in DEMO_PAIRS.items():
        if not (data / f"{split}.parquet").exists():
            make_preference_dataset(data, n, seed + SHAPES_SPLIT_SEED_OFFSET[split], split=split)
    common = {
        "seed": seed, "device": str(ctx.device), "resume": True, "data": {"source": str(data), "val_limit": None},
        "step_aware": {"base_model": f"shapes-teacher:{teacher}" if teacher else "shapes-teacher",
                       "guidance": ctx.config["sampler"]["guidance"]},
    }
    scorer, rows = None, []
    for name, stage in DEMO_STAGES.items():
        config = deep_merge(deep_merge(DEFAULTS, common), stage)
        config = deep_merge(config, {"out": str(ctx.run_dir / "reward" / name),
                                     "model": {"init_from": str(scorer) if scorer else None}})
        run_dir = prepare_run_dir(config)
        scorer = train(config, run_dir, ctx.log)
        summary = json.loads((run_dir / "summary.json").read_text())
        buckets = config["eval"]["timesteps"] if config["step_aware"]["base_model"] else ["clean"]
        rows += [{"model": name, "timestep": t, "accuracy": summary["final"].get(f"acc_{_bucket(t)}"),
                  "accuracy_noiseless": summary["final"].get(f"acc_true_{_bucket(t)}"),
                  "label_noise_ceiling": summary["label_noise_ceiling"]} for t in buckets]
    ctx.artifacts["step-aware"] = scorer
    ctx.results["reward"] = pd.DataFrame(rows)


def _bucket(t: int | str) -> str:
    return "clean" if t == "clean" else f"t{t}"
