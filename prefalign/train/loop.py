"""The one training loop of the alignment trainers (torchtune style: one explicit loop, methods by composition).

A method is a `Method`: its name, and `micro_batches(step, generator)`, which yields the micro-batches of one
optimizer step, each with its share of the loss. Everything else is the loop's: accelerate (DDP, mixed
precision) or FSDP (`train.distributed`, `prefalign.train.distributed`), the LoRA or full policy and its
reference, the optimizer and learning-rate schedule, gradient clipping, EMA, the NaN guard, checkpoints with exact
`--resume`, the metrics and evaluation CSVs and plots, compute accounting, and the saved pipeline.

`train_loop` is the loop itself, for anything `Trainable`; `train_policy` runs it on a diffusion policy, and
`prefalign.train.reward` on a preference scorer.

Exact resume: every random draw of a step comes from `generator`, seeded by (seed, step); a method that keeps
state between steps (an auxiliary network, a sampled round) returns it from `state_dict`, and the loop checkpoints
it beside the policy.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from prefalign.errors import PrefalignError
from prefalign.io import atomic_write_text
from prefalign.progress import track
from prefalign.train import distributed
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
from prefalign.train.policy import Policy, evaluation_weights, load_base_model


@dataclass
class MicroBatch:
    """One micro-batch of an optimizer step: its share of the step's loss (the loop backpropagates it as it is,
    so a method yielding k micro-batches divides by k), statistics to log, and the denoiser rows it cost on this
    process (`fb_rows` forward+backward, `fwd_rows` forward-only: reference passes, sampling)."""

    loss: torch.Tensor
    stats: Mapping[str, float] = field(default_factory=dict)
    fb_rows: int = 0
    fwd_rows: int = 0


@dataclass
class Method:
    """What a training method supplies to `train_policy` (or `train_loop`)."""

    name: str  # log prefix and file titles, e.g. "dpo"
    title: str  # plot titles, e.g. "Diffusion-DPO"
    micro_batches: Callable[[int, torch.Generator], Iterable[MicroBatch]]  # (step, generator) -> micro-batches
    plot_columns: Sequence[str] = ("loss",)  # metrics.csv columns drawn in metrics.png
    phase: Callable[[int], str] | None = None  # a label per step (e.g. "sft" / "dpo") for metrics.csv
    evaluate: Callable | None = None  # (model, prompts, rewards, eval config) -> row; default: common.evaluate
    state_dict: Callable[[], dict] = dict  # state kept between steps (auxiliary networks and their optimizers)
    load_state_dict: Callable[[dict], None] = lambda state: None
    on_save: Callable[[Path], None] | None = None  # writes extra files next to the saved pipeline


@dataclass
class Run:
    """What a method's builder gets: the resolved config, the accelerator, the policy and a main-process logger."""

    config: dict
    run_dir: Path
    accelerator: object
    policy: Policy
    log: Callable[[str], None]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def make_optimizer(params: Sequence[torch.nn.Parameter], train: Mapping, lr: float | None = None):
    """AdamW from the shared optimizer keys of `train` (lr, adam_betas, adam_eps, weight_decay)."""
    return torch.optim.AdamW(params, lr=lr if lr is not None else train["lr"],
                             betas=tuple(train.get("adam_betas", (0.9, 0.999))),
                             eps=train.get("adam_eps", 1e-8), weight_decay=train.get("weight_decay", 0.0))


class Trainable(Protocol):
    """What `train_loop` trains: a `Policy` (`train_policy`), or a reward scorer (`prefalign.train.reward`)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def prepare(self, accelerator, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Wrap the network (DDP per the accelerate launch) and the optimizer; returns the optimizer."""

    def trainable_state(self) -> dict:
        """The trained weights, whole (every process calls it: sharded ones are gathered)."""

    def load_trainable_state(self, state: dict) -> None: ...

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state for the checkpoint (every process calls it)."""

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None: ...

    def evaluation(self, accelerator, ema: EMA | None) -> AbstractContextManager:
        """The plain network in eval mode with the EMA weights (when `ema`), restored for training afterwards."""

    def train(self) -> None:
        """Put the network in training mode."""

    def save(self, out_dir: Path, main: bool) -> None:
        """Write the trained model to `out_dir` (every process calls it inside `evaluation`; `main` writes)."""


@dataclass
class Evaluation:
    """Periodic evaluation for `train_loop`, at step 0, every `eval.every` steps and at the end (0: never):
    `score(model)` runs on every process with the evaluation weights and returns the eval.csv row (None: none on
    this process); `plot(csv, png)` draws eval.png on the main process; `shown` columns go to the log line."""

    score: Callable[[object], Mapping[str, float] | None]
    plot: Callable[[Path, Path], None]
    shown: Sequence[str] = ()


class PolicyTrainable:
    """A `Policy` as a `Trainable`, saved as a pipeline directory (LoRA merged) in `save_dtype`."""

    def __init__(self, policy: Policy, save_dtype: str | None = None) -> None:
        self.policy, self.dtype = policy, getattr(torch, save_dtype) if save_dtype else None
        self.trainable_parameters, self.prepare = policy.trainable_parameters, policy.prepare
        self.trainable_state, self.load_trainable_state = policy.trainable_state, policy.load_trainable_state
        self.optimizer_state, self.load_optimizer_state = policy.optimizer_state, policy.load_optimizer_state

    def evaluation(self, accelerator, ema: EMA | None) -> AbstractContextManager:
        return evaluation_weights(self.policy, accelerator, ema)

    def train(self) -> None:
        self.policy.model.train(True)

    def save(self, out_dir: Path, main: bool) -> None:
        if main or self.policy.sharded:  # sharded weights are gathered by every process
            self.policy.save_pretrained(out_dir, self.dtype)


class KeepBest:
    """`eval.keep_best`: the evaluation weights of the step with the highest `reward` so far, kept in
    `run_dir/best` (written beside, then swapped in, so the folder always holds one whole model) and linked into
    the loop's output at the end (kept, so a finished run can be resumed with more steps). Selecting on training
    prompts is model selection without touching held-out ones."""

    def __init__(self, run_dir: Path, reward: str, state: Mapping | None) -> None:
        self.dir, self.reward = run_dir / "best", reward
        self.step, self.score = (int(state["step"]), float(state["score"])) if state else (None, float("-inf"))

    def state_dict(self) -> dict:
        return {"step": self.step, "score": self.score} if self.step is not None else {}

    def offer(self, step: int, row: Mapping | None, save: Callable[[Path], None], accelerator) -> None:
        """Called inside the evaluation weights on every process; `row` exists where the scores were computed."""
        better = [row is not None and float(row[self.reward]) > self.score]
        if accelerator.num_processes > 1:  # the main process decides; every process saves (FSDP gathers on all)
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(better)
        if not better[0]:
            return
        staging = self.dir.with_name("best.tmp")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        save(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.step, self.score = step, float(row[self.reward])
            atomic_write_text(staging / "best.json", json.dumps({"step": step, self.reward: self.score}) + "\n")
            shutil.rmtree(self.dir, ignore_errors=True)
            staging.rename(self.dir)
        accelerator.wait_for_everyone()

    def finish(self, out_dir: Path, main: bool) -> str:
        """Hard-link the kept weights into `out_dir` (the files are never rewritten in place); returns the log
        line."""
        if main:
            if not self.dir.is_dir():
                raise PrefalignError(f"{self.dir} is missing: the kept weights of step {self.step} were removed "
                                     "during the run; rerun without eval.keep_best or from scratch")
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.copytree(self.dir, out_dir, copy_function=os.link)
        return f"kept step {self.step}: best {self.reward} {self.score:.4g} of the evaluations"


def train_policy(config: dict, run_dir: Path, build: Callable[[Run], Method], log: Callable[[str], None] = print,
                 output: str = "model") -> Path:
    """Train the policy of `config["policy"]` on `config["model"]` with the method `build(run)` returns; returns
    `run_dir/output`, the saved pipeline (EMA weights when `train.ema_decay` is set). `train.distributed=fsdp`
    shards the policy over the processes (`prefalign.train.distributed`).

    Writes metrics.csv/png (training statistics every `train.log_every` steps), eval.csv/png (rewards on
    held-out prompts at step 0, every `eval.every` steps and at the end, against compute) and checkpoint.pt
    (every `train.checkpoint_every` steps and at the end; `resume: true` continues it exactly).
    """
    ev, pol = config["eval"], config["policy"]

    def load(device: torch.device) -> PolicyTrainable:
        policy = Policy(load_base_model(config["model"], device), pol["lora_rank"], pol["lora_alpha"],
                        pol["lora_targets"], pol["reference"])
        if distributed.sharding(config["train"].get("distributed", "ddp")):
            policy.shard()
        return PolicyTrainable(policy, config.get("save_dtype"))

    def setup(trainable: PolicyTrainable, accelerator, say: Callable[[str], None]) -> tuple[Method, Evaluation | None]:
        method = build(Run(config, run_dir, accelerator, trainable.policy, say))
        prompts = load_prompts(ev["prompts"], ev["num_prompts"]) if ev["every"] else []
        main = accelerator.is_main_process
        # The shared sampler spreads its batches over every process; a method's own evaluation runs on the main one.
        if not (prompts and ev["rewards"] and (main or method.evaluate is None)):
            return method, None
        rewards = load_eval_rewards(config, accelerator.device) if main else {}
        title = f"{method.title}: held-out rewards vs training compute (forward-equivalents)"
        score = (lambda model: method.evaluate(model, prompts, rewards, ev)) if method.evaluate else \
            (lambda model: evaluate(model, prompts, rewards, ev, accelerator))
        return method, Evaluation(score, lambda csv, png: plot_metrics(csv, png, list(rewards), x="compute",
                                                                       title=title), list(ev["rewards"]))

    return train_loop(config, run_dir, load, setup, log, output)


def train_loop(config: dict, run_dir: Path, load: Callable[[torch.device], Trainable],
               setup: Callable[[Trainable, object, Callable[[str], None]], tuple[Method, Evaluation | None]],
               log: Callable[[str], None] = print, output: str = "model") -> Path:
    """The loop itself: `load(device)` gives the trainable, `setup(trainable, accelerator, log)` the method and its
    evaluation; returns `run_dir/output`, where `trainable.save` wrote the model (EMA weights when
    `train.ema_decay` is set). Files as `train_policy`."""
    tr, ev = config["train"], config["eval"]
    keep = ev.get("keep_best")
    if keep and not (ev["every"] and keep in ev.get("rewards", ())):
        raise PrefalignError(f"eval.keep_best={keep} needs eval.every > 0 and {keep} in eval.rewards "
                             f"(now every={ev['every']}, rewards={list(ev.get('rewards', ()))})")
    accelerator = make_accelerator(config, accumulation_steps=1)  # methods split their steps into micro-batches
    main = accelerator.is_main_process
    say = log if main else (lambda _: None)
    checkpoint = Checkpoint(run_dir, bool(config.get("resume")))
    state = checkpoint.load()  # first: an existing run without --resume fails before any model loads
    trainable = load(accelerator.device)
    params = trainable.trainable_parameters()
    optimizer = trainable.prepare(accelerator, make_optimizer(params, tr))
    ema = EMA(params, tr["ema_decay"]) if tr.get("ema_decay") else None
    method, evaluation = setup(trainable, accelerator, say)
    keeper = KeepBest(run_dir, keep, state.get("best") if state else None) if keep else None

    metrics = MetricsLog(run_dir / "metrics.csv", main)
    evals = MetricsLog(run_dir / "eval.csv", main)
    counters = {"fwd_calls": 0, "fb_calls": 0, "seconds": 0.0}
    window: list[Mapping[str, float]] = []
    if state is not None:
        trainable.load_trainable_state(state["trainable"])
        trainable.load_optimizer_state(optimizer, state["optimizer"])
        if ema:
            ema.load_state_dict(state["ema"])
        method.load_state_dict(state["method"])
        counters, window = {k: state[k] for k in counters}, list(state["window"])
        say(f"[{method.name}] resuming {run_dir} at step {state['step']}")
    start, steps = (int(state["step"]) if state else 0), int(tr["steps"])
    metrics.truncate(start)
    evals.truncate(start)

    def record_eval(step: int) -> None:
        if not (evaluation or keeper):  # a method's own evaluation runs on the main process only
            return accelerator.wait_for_everyone()
        with trainable.evaluation(accelerator, ema) as model:
            row = evaluation.score(model) if evaluation else None
            if keeper:
                keeper.offer(step, row, lambda folder: trainable.save(folder, main), accelerator)
        if row is not None:
            evals.append({"step": step, **compute_row(counters), **row})
            if main:
                evaluation.plot(run_dir / "eval.csv", run_dir / "eval.png")
            say(f"[{method.name}] step {step}: " + ", ".join(f"{k} {row[k]:.4g}" for k in evaluation.shown
                                                             if k in row))
        accelerator.wait_for_everyone()

    if start == 0 and ev["every"]:
        record_eval(0)
    clock = time.time() - counters["seconds"]
    trainable.train()
    for step in track(range(start, steps), method.title, total=steps - start):
        lr = lr_at(step, tr["lr"], tr["warmup_steps"], steps, tr["lr_schedule"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        generator = torch.Generator().manual_seed(int(config["seed"]) * 1_000_003 + step)
        batches = iter(method.micro_batches(step, generator))
        while True:
            with accelerator.autocast():  # forward passes run inside the method's iterator
                micro = next(batches, None)
            if micro is None:
                break
            check_finite(accelerator.reduce(micro.loss.detach().float(), "mean"), step, checkpoint)
            accelerator.backward(micro.loss)
            counters["fb_calls"] += micro.fb_rows * accelerator.num_processes
            counters["fwd_calls"] += micro.fwd_rows * accelerator.num_processes
            window.append(dict(micro.stats))
        if tr["grad_clip"]:
            accelerator.clip_grad_norm_(params, tr["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            ema.update(step)
        done = step + 1
        counters["seconds"] = time.time() - clock
        if done % tr["log_every"] == 0 or done == steps:
            phase = {"phase": method.phase(step)} if method.phase else {}
            metrics.append({"step": done, **phase, **window_means(window), "lr": lr, **compute_row(counters)})
            window = []
        if ev["every"] and (done % ev["every"] == 0 or done == steps):
            record_eval(done)
        if done % tr["checkpoint_every"] == 0 or done == steps:
            checkpoint.save({"step": done, "trainable": trainable.trainable_state(),
                             "optimizer": trainable.optimizer_state(optimizer), "ema": ema.state_dict() if ema else [],
                             "method": method.state_dict(), "window": window, **counters,
                             "best": keeper.state_dict() if keeper else {}}, accelerator)
    if main and metrics.rows:
        plot_metrics(run_dir / "metrics.csv", run_dir / "metrics.png", method.plot_columns,
                     title=f"{method.title} training")
    out_dir = run_dir / output
    if keeper:
        say(f"[{method.name}] {keeper.finish(out_dir, main)}")
    else:
        with trainable.evaluation(accelerator, ema):
            trainable.save(out_dir, main)
    if main and method.on_save:
        method.on_save(out_dir)
    accelerator.wait_for_everyone()
    say(f"[{method.name}] {steps} steps, compute {compute_row(counters)['compute']:.3g} forward-equivalents; "
        f"model: {out_dir}")
    return out_dir


def window_means(window: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-key means over the micro-batch statistics logged since the last row (keys absent from some skipped)."""
    keys = dict.fromkeys(k for stats in window for k in stats)
    return {k: sum(s[k] for s in window if k in s) / sum(k in s for s in window) for k in keys}


def compute_row(counters: Mapping) -> dict:
    """Training compute so far: denoiser rows and forward-equivalents (a backward ≈ two forwards)."""
    fb, fwd = int(counters["fb_calls"]), int(counters["fwd_calls"])
    return {"fb_calls": fb, "fwd_calls": fwd, "compute": fwd + FORWARD_EQUIVALENTS_PER_BACKWARD_PASS * fb,
            "seconds": round(float(counters["seconds"]), 2)}
