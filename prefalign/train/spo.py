"""SPO: step-by-step preference optimisation with a step-aware preference model (Liang et al. 2024, arXiv
2406.04314; official code RockeyCoss/SPO `train_scripts/train_spo.py`).

Each round samples prompts, runs the step-wise resampler (`spo_sampling.sample_step_pairs`) with the current
policy, then takes one pass over the kept pairs with the D3PO-style step loss against a frozen reference. Log-
probabilities are Gaussian DDIM(η) transition densities of the CFG-combined prediction, as in the official code;
the per-transition log-ratio is *averaged* over the C·H·W dimensions (official `ddim_with_logprob`), so β = 10
there equals β = 10/(C·H·W) with `train.logprob=sum`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from prefalign.diffusion.models import Conditioning
from prefalign.diffusion.sampling import ddim_step
from prefalign.errors import PrefalignError
from prefalign.progress import track
from prefalign.train.common import (
    EMA,
    FORWARD_EQUIVALENTS_PER_BACKWARD_PASS,
    Checkpoint,
    MetricsLog,
    check_finite,
    evaluate,
    load_eval_rewards,
    load_prompts,
    lr_at,
    make_accelerator,
    plot_metrics,
)
from prefalign.train.policy import DEFAULT_LORA_TARGETS, Policy, evaluation_weights, load_base_model
from prefalign.train.spo_sampling import PoolStats, StepPairs, sample_step_pairs

DEFAULTS: dict = {
    "seed": 0,
    "device": "auto",
    "out": None,
    "resume": False,
    "log": {"with": None, "project": None},  # experiment tracker: tensorboard | wandb (train.common.make_accelerator)
    "model": None,  # base pipeline: None / "shapes-teacher[:DIR]" / a diffusers pipeline directory
    "preference": {"checkpoint": None},  # step-aware preference model directory (`prefalign train-reward`)
    "policy": {"lora_rank": 4, "lora_alpha": None, "lora_targets": list(DEFAULT_LORA_TARGETS),
               "reference": "copy"},
    "data": {"prompts": "shapes-train", "num_prompts": None},  # shapes-train | shapes-val | a prompt file
    # Official SD1.5 settings: DDIM 20 steps, η = 1, CFG 5, pools of k = 4, threshold 0.3, x_t at t ≤ 751 (16 of 20).
    "sample": {"steps": 20, "eta": 1.0, "guidance": 5.0, "pool_size": 4, "threshold": 0.3,
               "timestep_range": [0, 751], "batch_size": 10, "negative_prompt": ""},
    "train": {
        "rounds": 1000,  # sampling rounds; official SD1.5: 4,000 prompts × 10 epochs / 40 prompts per round
        "batch_size": 10,  # pairs per micro-batch (official train_batch_size)
        "grad_accum": 1,
        "mixed_precision": "no",
        "lr": 6e-5,
        "lr_schedule": "constant",
        "warmup_rounds": 0,  # the learning-rate schedule's clock is the round
        "weight_decay": 1e-4,
        "adam_betas": [0.9, 0.999],
        "adam_eps": 1e-8,
        "grad_clip": 1.0,
        "beta": 10.0,
        "clamp_eps": 0.1,  # D3PO ratio clamp to [1 − eps, 1 + eps]; null = plain step-wise DPO
        "logprob": "mean",  # mean (official) or sum over C·H·W of the transition log-density
        "ema_decay": None,
        "log_every": 1,
        "checkpoint_every": 50,
    },
    "eval": {
        "every": 50,  # rounds; evaluate at round 0, every N rounds and at the end; 0 = never
        "prompts": "shapes-val",  # shapes-train | shapes-val | a prompt file
        "num_prompts": 64,
        "samples_per_prompt": 1,
        "seed": 0,
        "steps": 20,
        "guidance": 5.0,
        "eta": 0.0,
        "batch_size": 32,
        "rewards": ["shapes-oracle"],
        "reward_checkpoints": {},  # reward name -> checkpoint, e.g. {"step-aware": DIR}
    },
    "save_dtype": None,  # e.g. float16 for the saved pipeline; training keeps fp32 master weights
}


def transition_log_ratio(
    x_prev: torch.Tensor, mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """log p_θ(x_{t−1}|x_t) − log p_ref(x_{t−1}|x_t) of two DDIM Gaussians with the same σ_t(η), [B].

    Equals the difference of `ddim_step(..., prev_sample=x_prev).log_prob` (summed) for the two means, but is
    formed element-wise first so the large normalising terms cancel exactly; `mean` divides by C·H·W as the
    official SPO/D3PO `ddim_with_logprob` does.
    """
    elementwise = ((x_prev - ref_mean) ** 2 - (x_prev - mean) ** 2) / (2 * std.expand_as(x_prev) ** 2)
    if reduction == "mean":
        return elementwise.flatten(1).mean(dim=1)
    if reduction == "sum":
        return elementwise.flatten(1).sum(dim=1)
    raise PrefalignError(f"train.logprob '{reduction}' unknown; use mean or sum")


def spo_loss(
    log_ratio_win: torch.Tensor, log_ratio_lose: torch.Tensor, beta: float, clamp_eps: float | None = None
) -> torch.Tensor:
    """Step-wise DPO loss −log σ(β·log r_w − β·log r_l), r = p_θ/p_ref (SPO/D3PO `train_spo.py`).

    `clamp_eps` clamps each ratio to [1 − eps, 1 + eps] before the log, as the official code does (the gradient
    vanishes once a ratio leaves that band); None gives the plain step-wise DPO objective. Per-pair values.
    """
    if clamp_eps is not None:
        low, high = math.log1p(-clamp_eps), math.log1p(clamp_eps)
        log_ratio_win, log_ratio_lose = log_ratio_win.clamp(low, high), log_ratio_lose.clamp(low, high)
    return -F.logsigmoid(beta * (log_ratio_win - log_ratio_lose))


def pair_log_ratios(
    policy: Policy, pairs: StepPairs, cond: Conditioning, uncond: Conditioning, guidance: float, eta: float,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log r_w, log r_l) of a batch of pairs: one policy and one reference evaluation of the shared x_t serve
    both the winner and the loser (the official code evaluates x_t twice). CFG-combined outputs (`train.cfg`)."""
    model = policy.model
    kwargs = dict(schedule=model.schedule, eta=eta, **_step_kwargs(model))
    out = model.guided(pairs.x_t, pairs.t, cond, uncond, guidance)
    ref = policy.reference_guided(pairs.x_t, pairs.t, cond, uncond, guidance)
    step = ddim_step(out, pairs.t, pairs.prev_t, pairs.x_t, prev_sample=pairs.x_win, **kwargs)
    ref_step = ddim_step(ref, pairs.t, pairs.prev_t, pairs.x_t, prev_sample=pairs.x_win, **kwargs)
    return (transition_log_ratio(pairs.x_win, step.mean, ref_step.mean, step.std, reduction),
            transition_log_ratio(pairs.x_lose, step.mean, ref_step.mean, step.std, reduction))


def _step_kwargs(model) -> dict:
    """The DDIM-step settings of `model.sampler_kwargs()` (spacing/offset only matter for the timestep grid)."""
    kw = model.sampler_kwargs()
    return {k: kw[k] for k in ("prediction_type", "final_alpha_cumprod", "clip_sample")}


def round_prompt_indices(n_prompts: int, round_index: int, batch: int, seed: int) -> list[int]:
    """Prompts of sampling round r: positions r·batch … (r+1)·batch − 1 of consecutive epochs, each epoch a
    seeded permutation of all prompts (the official data loader's shuffled epochs), so a resumed run draws the
    same prompts."""
    out = []
    for pos in range(round_index * batch, (round_index + 1) * batch):
        epoch, i = divmod(pos, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[i]))
    return out


class Compute:
    """Training compute in per-image denoiser evaluations, named as in `dpo.py`: `fwd_calls` forward-only rows
    (the sampling pools and continuing chains, and the frozen reference on the training pairs), `fb_calls`
    forward+backward rows of the policy; a CFG [uncond; cond] evaluation of one x_t counts as 2 rows. `compute`
    = fwd_calls + 3·fb_calls forward-equivalents. `scored` counts preference-model calls (decoded x̂_0)."""

    KEYS = ("sample_fwd", "reference_fwd", "fb_calls", "scored", "seconds")

    def __init__(self, state: dict | None = None) -> None:
        self.counts = {k: (state or {}).get(k, 0) for k in self.KEYS}

    def add(self, **counts: float) -> None:
        for key, value in counts.items():
            self.counts[key] += value

    def row(self) -> dict:
        c = self.counts
        fwd = int(c["sample_fwd"] + c["reference_fwd"])
        return {**{k: int(v) for k, v in c.items() if k != "seconds"}, "fwd_calls": fwd,
                "compute": fwd + FORWARD_EQUIVALENTS_PER_BACKWARD_PASS * int(c["fb_calls"]),
                "seconds": round(float(c["seconds"]), 2)}


def train(config: dict, run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """SPO from `config` (see DEFAULTS) in `run_dir`; returns `run_dir/"model"` (the merged pipeline directory).

    Writes metrics.csv/png (per `train.log_every` rounds: loss, implicit accuracy, kept pairs, compute),
    eval.csv/png (rewards on held-out prompts vs compute) and checkpoint.pt (every `train.checkpoint_every`
    rounds; `resume: true` continues it exactly: prompts and noise are functions of (seed, round, rank)).
    """
    from prefalign.rewards.registry import load

    sample, tr, ev = config["sample"], config["train"], config["eval"]
    if not config["preference"].get("checkpoint"):
        raise PrefalignError("preference.checkpoint is not set: pass a step-aware preference model directory "
                             "(`prefalign train-reward`), e.g. preference.checkpoint=runs/reward/scorer")
    accelerator = make_accelerator(config)
    device, main = accelerator.device, accelerator.is_main_process
    pol = config["policy"]
    policy = Policy(load_base_model(config["model"], device), pol["lora_rank"], pol["lora_alpha"],
                    pol["lora_targets"], pol["reference"])
    model, params = policy.model, policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=tr["lr"], betas=tuple(tr["adam_betas"]), eps=tr["adam_eps"],
                                  weight_decay=tr["weight_decay"])
    optimizer = policy.prepare(accelerator, optimizer)
    ema = EMA(params, tr["ema_decay"]) if tr["ema_decay"] else None
    scorer = load("step-aware", checkpoint=config["preference"]["checkpoint"], device=device)
    prompts = load_prompts(config["data"]["prompts"], config["data"]["num_prompts"])
    held_out = load_prompts(ev["prompts"], ev["num_prompts"]) if ev["every"] else []
    rewards = load_eval_rewards(config, device) if main and held_out and ev["rewards"] else {}

    checkpoint = Checkpoint(run_dir, bool(config.get("resume")))
    metrics, evals = MetricsLog(run_dir / "metrics.csv", main), MetricsLog(run_dir / "eval.csv", main)
    state = checkpoint.load()
    start, opt_steps, compute = 0, 0, Compute()
    if state is not None:
        policy.load_trainable_state(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start, opt_steps, compute = int(state["step"]), int(state["opt_steps"]), Compute(state["compute"])
        accelerator.step = int(state["micro_steps"])  # gradient-accumulation boundaries survive the resume
        log(f"[spo] resuming {run_dir} at round {start}")
    metrics.truncate(start)
    evals.truncate(start)

    def record_eval(done: int) -> None:
        if rewards:
            with evaluation_weights(policy, accelerator, ema) as eval_model:
                row = evaluate(eval_model, held_out, rewards, ev)
            evals.append({"step": done, "opt_steps": opt_steps, **compute.row(), **row})
        accelerator.wait_for_everyone()

    if start == 0 and ev["every"]:
        record_eval(0)
    rounds, world, rank = int(tr["rounds"]), accelerator.num_processes, accelerator.process_index
    batch, micro, cfg_rows = int(sample["batch_size"]), int(tr["batch_size"]), 1 if sample["guidance"] == 1 else 2
    uncond_one = model.encode_prompts([sample["negative_prompt"]])
    t0, window = time.time() - compute.counts["seconds"], list(state.get("window", [])) if state else []
    for r in track(range(start, rounds), "SPO", total=rounds - start):
        lr = lr_at(r, tr["lr"], int(tr["warmup_rounds"]), rounds, tr["lr_schedule"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Sampling: each process takes its slice of the round's prompts and draws its own noise.
        idx = round_prompt_indices(len(prompts), r, batch * world, int(config["seed"]))[rank * batch:][:batch]
        round_prompts = [prompts[i] for i in idx]
        gen = torch.Generator(device=device).manual_seed((int(config["seed"]) * 1_000_003 + r) * 1024 + rank)
        model.train(False)
        pairs, stats = sample_round(model, scorer, round_prompts, uncond_one, sample, gen)
        compute.add(sample_fwd=stats.denoiser_rows * cfg_rows * world, scored=stats.scored * world)
        # One pass over the kept pairs; every process trains on the same count (DDP needs matching backwards).
        n = int(accelerator.gather(torch.tensor([len(pairs)], device=device)).min())
        pairs = pairs.index(torch.randperm(len(pairs), generator=gen, device=device)[:n])
        cond_all = model.encode_prompts(round_prompts)
        window.append({"pairs": float(n * world), "keep_rate": stats.kept / max(stats.considered, 1),
                       "gap": stats.gap_sum / max(stats.considered, 1)})
        model.train(True)
        for b in range(0, n, micro):
            mb = pairs.index(slice(b, b + micro))
            cond, uncond = cond_all.index(mb.prompt), uncond_one.repeat_interleave(len(mb))
            with accelerator.accumulate(model.denoiser):
                with accelerator.autocast():
                    lr_w, lr_l = pair_log_ratios(policy, mb, cond, uncond, sample["guidance"], sample["eta"],
                                                 tr["logprob"])
                    loss = spo_loss(lr_w.float(), lr_l.float(), tr["beta"], tr["clamp_eps"]).mean()
                check_finite(accelerator.reduce(loss.detach(), "mean"), r, checkpoint)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tr["grad_clip"]:
                    accelerator.clip_grad_norm_(params, tr["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                opt_steps += 1
                if ema is not None:
                    ema.update(opt_steps)
            compute.add(fb_calls=len(mb) * cfg_rows * world, reference_fwd=len(mb) * cfg_rows * world)
            lr_w, lr_l = lr_w.detach(), lr_l.detach()
            window.append({"loss": float(loss.detach()), "implicit_acc": float((lr_w > lr_l).float().mean()),
                           "log_ratio_win": float(lr_w.mean()), "log_ratio_lose": float(lr_l.mean())})
        done = r + 1
        compute.counts["seconds"] = time.time() - t0
        if done % int(tr["log_every"]) == 0 or done == rounds:
            keys = dict.fromkeys(k for w in window for k in w)
            means = {k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in keys}
            metrics.append({"step": done, "opt_steps": opt_steps, **means, "lr": lr, **compute.row()})
            window = []
        if ev["every"] and (done % int(ev["every"]) == 0 or done == rounds):
            record_eval(done)
        if done % int(tr["checkpoint_every"]) == 0 or done == rounds:
            checkpoint.save({
                "step": done, "opt_steps": opt_steps, "micro_steps": int(accelerator.step),
                "trainable": policy.trainable_state(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else [], "compute": dict(compute.counts),
                "window": window,  # metrics since the last logged row: a resumed run logs the same means
            }, accelerator)
    if main and metrics.rows:
        plot_metrics(run_dir / "metrics.csv", run_dir / "metrics.png", ["loss", "implicit_acc", "pairs", "gap"],
                     title="SPO training (per round)")
    if main and evals.rows:
        plot_metrics(run_dir / "eval.csv", run_dir / "eval.png", list(rewards), x="compute",
                     title="SPO: held-out rewards vs training compute (forward-equivalents)")
    out_dir = run_dir / "model"
    if main:
        with evaluation_weights(policy, accelerator, ema):
            policy.save_pretrained(out_dir, getattr(torch, config["save_dtype"]) if config["save_dtype"] else None)
    accelerator.wait_for_everyone()
    log(f"[spo] {rounds} rounds, {opt_steps} optimizer steps, compute {compute.row()['compute']:.3g} "
        f"forward-equivalents; model: {out_dir}")
    return out_dir


def sample_round(model, scorer, prompts: list[str], uncond_one: Conditioning, sample: dict,
                 generator: torch.Generator) -> tuple[StepPairs, PoolStats]:
    """Run the step-wise resampler on `prompts` with the current policy and the step-aware preference model."""
    cond = model.encode_prompts(prompts)
    uncond = uncond_one.repeat_interleave(len(prompts))
    guidance = float(sample["guidance"])

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device) % len(prompts)  # pools are [k, B] flattened
        return model.guided(x, t, cond.index(rows), uncond.index(rows), guidance)

    def score(images: torch.Tensor, t: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        return scorer.score_x0(images, t, [prompts[i] for i in prompt_index.tolist()]).float()

    x_T = torch.randn((len(prompts), *model.sample_shape), generator=generator, device=model.device,
                      dtype=model.dtype)
    return sample_step_pairs(
        denoise, model.decode, score, x_T, model.schedule, int(sample["steps"]), int(sample["pool_size"]),
        float(sample["threshold"]), eta=float(sample["eta"]), timestep_range=tuple(sample["timestep_range"]),
        generator=generator, **model.sampler_kwargs(),
    )


DEMO_OVERRIDES: dict = {
    "policy": {"lora_rank": None},  # the teacher's attention is only at 8×8: LoRA there barely moves it
    "sample": {"steps": 10, "guidance": 3.0, "batch_size": 8},
    "train": {"rounds": 4, "batch_size": 16, "lr": 1e-4, "checkpoint_every": 4},
    "eval": {"every": 0},
    "resume": True,  # re-running the demo reuses the finished stage
}


def demo_stage(ctx) -> None:
    """`prefalign demo` stage "spo": a short SPO run of the teacher with the step-aware preference model of the
    "reward" stage (`ctx.artifacts["step-aware"]`) in `spo/`; registers generator "SPO" (sampled like the
    teacher) for the leaderboard."""
    from prefalign.config import deep_merge
    from prefalign.runs import prepare_run_dir
    from prefalign.shapes.generators import teacher_source

    if "step-aware" not in ctx.artifacts:
        raise PrefalignError("demo stage spo needs the step-aware preference model of the reward stage; "
                             "list 'reward' before 'spo' in stages")
    sampler, teacher = ctx.config["sampler"], ctx.config["teacher"]
    config = deep_merge(DEFAULTS, DEMO_OVERRIDES)
    config.update(seed=ctx.config["seed"], device=str(ctx.device), out=str(ctx.run_dir / "spo"),
                  model=f"shapes-teacher:{teacher}" if teacher else None,
                  preference={"checkpoint": str(ctx.artifacts["step-aware"])})
    model_dir = train(config, prepare_run_dir(config), log=ctx.log)
    source = teacher_source(model_dir, ctx.device, sampler["steps"], sampler["guidance"], sampler["eta"])
    source.nfe = sampler["steps"] * (1 if sampler["guidance"] == 1 else 2)
    ctx.generators["SPO"] = source
    ctx.artifacts["spo"] = model_dir
