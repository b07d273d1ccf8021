"""Pretrain the shapes teacher on web data: DDPM denoising loss, CFG prompt dropout, EMA, resumable.

Options from the same research line are switchable here and measured in benchmarks/: Min-SNR-γ loss weighting
(`train.weighting=min_snr`) and Laplace logSNR timestep sampling (`train.timesteps.kind=laplace`).
"""

from __future__ import annotations

import copy
import csv
import math
import time
from pathlib import Path

import torch

from prefalign.diffusion.generate import sample_images
from prefalign.diffusion.losses import denoising_loss, per_sample_mse
from prefalign.diffusion.schedules import predicted_x0_eps, training_target
from prefalign.diffusion.timesteps import TimestepSampler
from prefalign.errors import PrefalignError
from prefalign.io import atomic_save, atomic_write_text
from prefalign.progress import track
from prefalign.shapes.grammar import sample_prompts
from prefalign.shapes.oracle import oracle
from prefalign.shapes.teacher import DEFAULT_ARCH, build_teacher, text_states
from prefalign.shapes.webdata import make_web_dataset

PRETRAIN_DEFAULTS: dict = {
    "seed": 0,
    "device": "cpu",
    "out": None,
    "data": {"num_examples": 20000, "seed": 1},
    "train": {
        "steps": 1500,
        "batch_size": 32,
        "lr": 2e-3,
        "warmup_steps": 200,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "prompt_dropout": 0.1,  # CFG needs an unconditional model: "" replaces the prompt this often
        "ema_decay": 0.999,
        "weighting": "uniform",
        "snr_gamma": 5.0,
        "timesteps": {"kind": "uniform", "loc": 0.0, "scale": None},
    },
    "eval": {"every": 250, "num_val": 512, "val_seed": 2, "num_samples": 64, "sample_steps": 20, "guidance": 3.0},
    "checkpoint_every": 250,
    "save_dtype": "float16",
    "arch": DEFAULT_ARCH,
}
METRICS_FIELDS = ["step", "train_loss", "val_loss", "oracle", "lr", "seconds"]


class EMA:
    """Exponential moving average of parameters with the usual warm-up: decay_k = min(decay, (1 + k)/(10 + k))."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s.to(p.dtype))


def _lr(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def validation_loss(model, x0: torch.Tensor, prompts: list[str], seed: int) -> float:
    """Unweighted ε-space MSE on held-out web data at fixed, evenly spread timesteps and fixed noise.

    Measured in one space whatever the training weighting, so weighting schemes are comparable.
    """
    g = torch.Generator().manual_seed(seed)
    n, T = x0.shape[0], model.schedule.num_timesteps
    t = torch.linspace(0, T - 1, n).round().long()
    noise = torch.randn(x0.shape, generator=g)
    total = 0.0
    for i in range(0, n, 128):
        sl = slice(i, i + 128)
        x_t = model.schedule.add_noise(x0[sl], noise[sl], t[sl])
        out = model(x_t.to(model.device), t[sl].to(model.device), model.encode_prompts(prompts[sl]))
        alpha, sigma = model.schedule.alpha_sigma(t[sl], like=x0[sl])
        eps_target = training_target(x0[sl], noise[sl], alpha, sigma, "epsilon")
        if model.prediction_type != "epsilon":
            out = predicted_x0_eps(out.cpu(), x_t, alpha, sigma, model.prediction_type)[1]
        total += float(per_sample_mse(out.cpu(), eps_target).sum())
    return total / n


@torch.no_grad()
def sample_oracle(model, num: int, steps: int, guidance: float, seed: int) -> float:
    """Mean oracle score of teacher samples on `num` held-out prompts."""
    prompts = sample_prompts(num, seed)
    images = sample_images(model, prompts, seeds=[seed * 100_000 + i for i in range(num)], num_steps=steps,
                           guidance_scale=guidance)
    return float(oracle(images.cpu(), prompts).mean())


def pretrain_teacher(config: dict, run_dir: Path) -> Path:
    """Train a teacher from `config` (see PRETRAIN_DEFAULTS) in `run_dir`; resumes from its checkpoint.

    Writes `metrics.csv`, `checkpoint.pt` (every `checkpoint_every` steps, atomically) and finally the EMA model
    as a pipeline directory `run_dir/teacher` (weights cast to `save_dtype`). Returns that directory.
    """
    train, ev = config["train"], config["eval"]
    device = torch.device(config.get("device") or "cpu")
    model = build_teacher(config["arch"], seed=config["seed"]).to(device)
    model.text_encoders.requires_grad_(True)  # trained jointly here; frozen again in the saved pipeline
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])
    ema = EMA(params, train["ema_decay"])
    sampler = TimestepSampler(**train["timesteps"])

    prompts, images = make_web_dataset(config["data"]["num_examples"], config["data"]["seed"],
                                       config["arch"]["image_size"])
    val_prompts, val_images = make_web_dataset(ev["num_val"], ev["val_seed"], config["arch"]["image_size"])
    val_x0 = val_images.float() / 127.5 - 1

    ckpt_path, metrics_path = run_dir / "checkpoint.pt", run_dir / "metrics.csv"
    start, rows = 0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.shadow = [s.to(device) for s in state["ema"]]
        start, rows = state["step"], _read_metrics(metrics_path)
    steps = train["steps"]
    t0 = time.time() - (rows[-1]["seconds"] if rows else 0.0)  # wall time accumulates across resumes
    model.train()
    for step in track(range(start, steps), "pretraining the shapes teacher", total=steps - start):
        g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + step)  # data order is a function of step
        idx = torch.randint(0, len(prompts), (train["batch_size"],), generator=g)
        x0 = (images[idx].float() / 127.5 - 1).to(device)
        drop = torch.rand(len(idx), generator=g) < train["prompt_dropout"]
        batch_prompts = ["" if d else prompts[i] for i, d in zip(idx.tolist(), drop.tolist(), strict=True)]
        t = sampler(len(idx), model.schedule, g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        x_t = model.schedule.add_noise(x0, noise, t)
        out = model.denoiser(x_t, t, encoder_hidden_states=text_states(model, batch_prompts)).sample
        loss = denoising_loss(out, x0, noise, t, model.schedule, model.prediction_type, train["weighting"],
                              train["snr_gamma"]).mean()
        if not torch.isfinite(loss):
            raise PrefalignError(f"loss became {float(loss)} at step {step}; last good checkpoint: {ckpt_path}")
        lr = _lr(step, train["lr"], train["warmup_steps"], steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train["grad_clip"])
        optimizer.step()
        ema.update(step)

        done = step + 1
        if done % ev["every"] == 0 or done == steps:
            ema_model = _ema_copy(model, ema, params)
            val = validation_loss(ema_model, val_x0, val_prompts, ev["val_seed"])
            score = (sample_oracle(ema_model, ev["num_samples"], ev["sample_steps"], ev["guidance"], ev["val_seed"])
                     if ev["num_samples"] else math.nan)
            rows.append({"step": done, "train_loss": loss.item(), "val_loss": val, "oracle": score, "lr": lr,
                         "seconds": time.time() - t0})
            _write_metrics(metrics_path, rows)
            model.train()
        if done % config["checkpoint_every"] == 0 or done == steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.shadow,
                     "step": done}
            atomic_save(ckpt_path, lambda p, s=state: torch.save(s, p))

    final = _ema_copy(model, ema, params)
    final.text_encoders.requires_grad_(False)
    out_dir = run_dir / "teacher"
    final.to(getattr(torch, config.get("save_dtype", "float32"))).save_pretrained(out_dir)
    return out_dir


def _ema_copy(model, ema: EMA, params: list[torch.nn.Parameter]):
    """A copy of `model` holding the EMA weights, in eval mode."""
    clone = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    clone_params = dict(clone.named_parameters())
    ema.copy_to([clone_params[names[id(p)]] for p in params])
    return clone.eval()


def _write_metrics(path: Path, rows: list[dict]) -> None:
    lines = [",".join(METRICS_FIELDS)] + [",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k])
                                                   for k in METRICS_FIELDS) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]
