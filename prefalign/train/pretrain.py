"""Pretrain the shapes teacher on web data: DDPM denoising loss, CFG prompt dropout, EMA, resumable.

As in Stable Diffusion, the text encoder is pretrained contrastively first (`text_encoder.mode=contrastive`, see
`prefalign.shapes.text_encoder`); it then follows the UNet at `text_encoder.finetune_lr_scale` of its learning
rate (0.1 by default: +0.05 on the oracle at 10,000 steps against the frozen encoder, benchmarks/RESULTS.md; 0 freezes it, as
SD's CLIP). `text_encoder.mode=joint` trains a randomly initialised encoder together with the UNet instead (the
recipe of the first shipped teacher).
Options from the same research line are switchable here and measured in benchmarks/: Min-SNR-γ loss weighting
(`train.weighting=min_snr`) and Laplace logSNR timestep sampling (`train.timesteps.kind=laplace`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from prefalign.diffusion.generate import sample_images
from prefalign.diffusion.losses import denoising_loss, per_sample_mse
from prefalign.diffusion.schedules import predicted_x0_eps, training_target
from prefalign.diffusion.timesteps import TimestepSampler
from prefalign.errors import PrefalignError
from prefalign.io import atomic_write_text
from prefalign.progress import track
from prefalign.shapes.grammar import sample_prompts
from prefalign.shapes.oracle import oracle
from prefalign.shapes.teacher import DEFAULT_ARCH, build_teacher, text_states
from prefalign.shapes.text_encoder import TEXT_PRETRAIN_DEFAULTS, pretrain_text_encoder
from prefalign.shapes.webdata import make_web_dataset
from prefalign.train.common import EMA, Checkpoint, MetricsLog, check_finite, lr_at

PRETRAIN_DEFAULTS: dict = {
    "seed": 0,
    "device": "cpu",
    "out": None,
    "data": {"num_examples": 50000, "seed": 1},
    # finetune_lr_scale 0.1: the shipped teacher's encoder follows the UNet at a tenth of its rate (binding of
    # attributes and places, benchmarks/RESULTS.md "The shipped teacher").
    "text_encoder": {"mode": "contrastive", **TEXT_PRETRAIN_DEFAULTS, "finetune_lr_scale": 0.1},
    "train": {
        "steps": 13000,
        "batch_size": 32,
        "lr": 1e-3,
        "warmup_steps": 200,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "prompt_dropout": 0.1,  # CFG needs an unconditional model: "" replaces the prompt this often
        "ema_decay": 0.999,
        "weighting": "min_snr",  # Min-SNR-γ (Hang et al. 2023): faster convergence, measured in benchmarks/
        "snr_gamma": 5.0,
        "timesteps": {"kind": "uniform", "loc": 0.0, "scale": None},
    },
    "eval": {"every": 1000, "num_val": 512, "val_seed": 2, "num_samples": 128, "sample_steps": 25, "guidance": 3.0},
    "checkpoint_every": 500,
    "save_dtype": "float16",
    "arch": DEFAULT_ARCH,
}


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
    text_config = config["text_encoder"]
    if text_config["mode"] not in ("contrastive", "joint"):
        raise PrefalignError(f"text_encoder.mode '{text_config['mode']}' unknown; use contrastive or joint")
    joint = text_config["mode"] == "joint"
    # Contrastive pretraining learns what a prompt says, not how the UNet must bind attributes to places; a
    # slow fine-tune lets the denoising loss shape the token states (frozen in the saved pipeline either way).
    text_scale = 1.0 if joint else text_config["finetune_lr_scale"]
    model.text_encoders.requires_grad_(text_scale > 0)
    text_ids = {id(p) for p in model.text_encoders.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in text_ids], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in text_ids], "lr_scale": text_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train["lr"],
                                  weight_decay=train["weight_decay"])
    ema = EMA(params, train["ema_decay"])
    sampler = TimestepSampler(**train["timesteps"])

    prompts, images = make_web_dataset(config["data"]["num_examples"], config["data"]["seed"],
                                       config["arch"]["image_size"])
    val_prompts, val_images = make_web_dataset(ev["num_val"], ev["val_seed"], config["arch"]["image_size"])
    val_x0 = val_images.float() / 127.5 - 1

    checkpoint = Checkpoint(run_dir, resume=True)  # `shapes pretrain --out DIR` always continues DIR
    metrics = MetricsLog(run_dir / "metrics.csv")
    start = 0
    if (state := checkpoint.load()) is not None:  # holds the pretrained text encoder too
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start = state["step"]
        metrics.truncate(start)
    else:
        metrics.rows = []
        if not joint:
            summary = pretrain_text_encoder(model.text_encoders[0], model.tokenizers[0],
                                            **{k: v for k, v in text_config.items() if k in TEXT_PRETRAIN_DEFAULTS})
            atomic_write_text(run_dir / "text_encoder.json", json.dumps(summary, indent=2) + "\n")
            model.text_encoders.requires_grad_(text_scale > 0)  # the pretraining froze it
    steps = train["steps"]
    last = metrics.rows[-1] if metrics.rows else {}
    t0 = time.time() - last.get("seconds", 0.0)  # wall and CPU time accumulate over resumes
    cpu0 = time.process_time() - last.get("cpu_seconds", 0.0)
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
        check_finite(loss, step, checkpoint)
        lr = lr_at(step, train["lr"], train["warmup_steps"], steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
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
            metrics.append({"step": done, "train_loss": loss.item(), "val_loss": val, "oracle": score, "lr": lr,
                            "seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0})
            model.train()
        if done % config["checkpoint_every"] == 0 or done == steps:
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "ema": ema.state_dict(), "step": done})

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
