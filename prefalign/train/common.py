"""What every trainer shares: accelerator set-up, learning-rate schedule, EMA, resumable checkpoints, the NaN
guard, metrics CSV + plot, and reward tables for periodic evaluation.

Trainers stay explicit loops (torchtune style); these are the small pieces they call, not a base class.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from prefalign.diffusion.generate import sample_images
from prefalign.errors import PrefalignError
from prefalign.io import atomic_path, atomic_save, atomic_write_text
from prefalign.stats import bootstrap_ci
from prefalign.train.distributed import full, like, spread_calls


class EMA:
    """Exponential moving average of parameters with the usual warm-up: decay_k = min(decay, (1 + k)/(10 + k))."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> list[torch.Tensor]:
        """The averages, whole (gathered from the shards of sharded parameters: every process calls it)."""
        return [full(s) for s in self.shadow]

    def load_state_dict(self, shadow: Sequence[torch.Tensor]) -> None:
        self.shadow = [like(s.to(p.device).float(), p) for s, p in zip(shadow, self.params, strict=True)]


@contextlib.contextmanager
def ema_weights(params: Sequence[torch.nn.Parameter], ema: EMA | None) -> Iterator[None]:
    """`params` hold the EMA weights inside the block (unchanged without an EMA) and their own ones after it."""
    backup = [p.detach().clone() for p in params] if ema else []
    if ema:
        ema.copy_to(params)
    try:
        yield
    finally:
        if ema:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)


def lr_at(step: int, base: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to 10 % of `base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise PrefalignError(f"train.lr_schedule '{schedule}' unknown; use constant or cosine")
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


TRACKERS = ("tensorboard", "wandb")  # accelerate's names; each is also the package it needs
_TRACKING: dict = {"accelerator": None}  # the accelerator whose trackers MetricsLog rows also go to


def make_accelerator(config: Mapping, accumulation_steps: int | None = None):
    """An `accelerate.Accelerator` from `config["device"]` and `config["train"]` (`mixed_precision`: no | fp16 |
    bf16, `grad_accum` unless `accumulation_steps` is given). Under `torchrun` it joins the process group (gloo on CPU, NCCL on GPUs).

    `config["log"]["with"]`: an experiment tracker (tensorboard | wandb, or from Python an accelerate
    `GeneralTracker`) that receives every metrics row as well; the CSV and PNG files are written either way."""
    import importlib.util

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    train = config.get("train", {})
    precision = train.get("mixed_precision", "no") or "no"
    if precision not in ("no", "fp16", "bf16"):
        raise PrefalignError(f"train.mixed_precision '{precision}' unknown; use no, fp16 or bf16")
    cpu = str(config.get("device", "cpu")).startswith("cpu")
    if cpu and precision == "fp16":
        raise PrefalignError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    log = config.get("log") or {}
    tracker = log.get("with")
    if isinstance(tracker, str) and tracker not in TRACKERS:
        raise PrefalignError(f"log.with '{tracker}' unknown; use one of {', '.join(TRACKERS)}")
    if isinstance(tracker, str) and importlib.util.find_spec(tracker) is None:
        raise PrefalignError(f"log.with={tracker} needs the {tracker} package: pip install {tracker}, or drop log.with")
    AcceleratorState._reset_state()  # one state per process; in-process runs (tests, demo stages) differ in precision
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, log_with=tracker or None,
                              project_dir=config.get("out"), gradient_accumulation_steps=accumulation_steps or int(train.get("grad_accum", 1)))
    if tracker:
        accelerator.init_trackers(log.get("project") or "prefalign", config=_scalar_settings(config))
    _TRACKING["accelerator"] = accelerator if tracker else None
    return accelerator


def _scalar_settings(config: Mapping, prefix: str = "") -> dict:
    """The config flattened to dotted keys with the scalar values trackers accept as hyperparameters."""
    flat: dict = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_scalar_settings(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            flat[f"{prefix}{key}"] = value
    return flat


class Checkpoint:
    """`run_dir/checkpoint.pt`: written atomically by the main process, loaded with `weights_only=True`.

    An existing checkpoint is only picked up with `resume=True`, so a typo in `--out` never silently continues (or
    overwrites) someone else's run.
    """

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.path, self.resume = Path(run_dir) / "checkpoint.pt", resume
        self.last_step: int | None = None

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        if not self.resume:
            raise PrefalignError(f"{self.path} exists: pass --resume to continue that run, or choose a new --out")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated file cannot happen with atomic writes, but a foreign one can
            raise PrefalignError(f"cannot read checkpoint {self.path} ({type(exc).__name__}); delete it to restart") from None
        self.last_step = int(state.get("step", 0))
        return state

    def save(self, state: dict, accelerator=None) -> None:
        if accelerator is None or accelerator.is_main_process:
            atomic_save(self.path, lambda p: torch.save(state, p))
        if accelerator is not None:
            accelerator.wait_for_everyone()
        self.last_step = int(state.get("step", 0))


def check_finite(loss: torch.Tensor, step: int, checkpoint: Checkpoint) -> None:
    """The NaN guard: stop at the first non-finite loss, naming the step and the last good checkpoint."""
    if torch.isfinite(loss).all():
        return
    last = (f"{checkpoint.path} (step {checkpoint.last_step})" if checkpoint.last_step is not None
            else "none written yet")
    raise PrefalignError(f"training loss became {float(loss.detach().float().mean())} at step {step}; "
                         f"last good checkpoint: {last}; stopped (lower train.lr, then --resume)")


class MetricsLog:
    """A CSV of metric rows (one per evaluation); rewritten atomically so a kill never leaves half a file. Rows
    also go to the experiment tracker of the run's accelerator (`log.with`), named `<file stem>/<column>`."""

    def __init__(self, path: Path, main_process: bool = True) -> None:
        self.path, self.main_process = Path(path), main_process
        self.tracker = _TRACKING["accelerator"]
        self.rows: list[dict] = []
        if self.path.exists():
            with self.path.open() as f:
                self.rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def truncate(self, step: int) -> None:
        """Drop the rows a run continuing from checkpoint `step` recomputes: those after `step`, and all of them
        when there is no checkpoint yet (step 0: a run killed before its first checkpoint logs step 0 again)."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step] if step > 0 else []

    def append(self, row: Mapping) -> None:
        self.rows.append(dict(row))
        if not self.main_process:
            return
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        lines = [",".join(fields)] + [",".join(_format(r.get(k, "")) for k in fields) for r in self.rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
        if self.tracker is not None:
            values = {f"{self.path.stem}/{k}": v for k, v in row.items()
                      if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
            self.tracker.log(values, step=int(row.get("step", 0)))


def _number(text: str) -> float | int | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _format(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def plot_metrics(csv_path: Path, png_path: Path, columns: Sequence[str], x: str = "step",
                 title: str | None = None) -> None:
    """One panel per metric column against `x` (matplotlib, Agg backend); columns `<c>_lo`/`<c>_hi` present in
    the CSV are drawn as a confidence band around `<c>`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.read_csv(csv_path)
    columns = [c for c in columns if c in frame]
    if not columns:
        return
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 2.8), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        ax.plot(frame[x], frame[column], marker="o", markersize=3)
        if f"{column}_lo" in frame and f"{column}_hi" in frame:
            ax.fill_between(frame[x], frame[f"{column}_lo"], frame[f"{column}_hi"], alpha=0.25)
        ax.set_xlabel(x)
        ax.set_title(column, fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def load_prompts(spec: str, num: int | None = None) -> list[str]:
    """`shapes-train` / `shapes-val` (built in) or a prompt file (.txt one per line, .csv/.jsonl/.json with a
    prompt/caption column, as `prefalign bench` reads `file:PATH`); the first `num` when given."""
    if spec in ("shapes-train", "shapes-val"):
        from prefalign.shapes.prompts import prompt_set

        prompts = list(prompt_set(spec.split("-")[1]))
    else:
        from prefalign.bench.suites import load_suite

        prompts = [item.text for item in load_suite(spec if spec.startswith("file:") else f"file:{spec}").prompts]
    return prompts[:num] if num else prompts


def run_defaults() -> dict:
    """The keys every trainer's config starts with (fresh dicts: callers may change them)."""
    return {
        "seed": 0,
        "device": "auto",
        "out": None,
        "resume": False,
        "log": {"with": None, "project": None},  # experiment tracker: tensorboard | wandb (make_accelerator)
    }


def policy_train_defaults(**changes: object) -> dict:
    """The `train` keys every policy trainer shares (optimizer, schedule, precision, processes, EMA, logging),
    with per-trainer `changes`; keys only one trainer has are passed here too and follow the shared ones."""
    return {
        "steps": 100,
        "batch_size": 8,
        "lr": 1e-5,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "weight_decay": 1e-2,
        "grad_clip": 1.0,
        "mixed_precision": "no",
        "distributed": "ddp",  # ddp | fsdp: shard weights, gradients and optimizer state over the processes
        "ema_decay": None,
        "log_every": 10,
        "checkpoint_every": 100,
        **changes,
    }


def sampled_eval_defaults(**changes: object) -> dict:
    """Periodic evaluation of a multi-step sampler (`evaluate`), with per-trainer `changes`."""
    return {
        "every": 100,  # evaluate at step 0, every N steps and at the end; 0 = never
        "prompts": "shapes-val",  # shapes-val | shapes-train | a prompt file
        "num_prompts": 32,
        "samples_per_prompt": 1,
        "seed": 0,
        "steps": 20,
        "guidance": 3.0,
        "eta": 0.0,
        "batch_size": 32,
        "rewards": ["shapes-oracle", "shapes-clip"],
        "reward_checkpoints": {},  # reward name -> checkpoint, e.g. {"step-aware": DIR}
        "reward_options": {},  # reward name -> {option: value}
        "keep_best": None,  # an eval reward: save the weights of its best evaluation instead of the last
        **changes,
    }


# A backward pass costs about two forwards (measured 3.1x forward+backward on the shapes teacher): trainers report
# compute as forward-only rows + this factor x forward+backward rows.
FORWARD_EQUIVALENTS_PER_BACKWARD_PASS = 3


def load_eval_rewards(config: dict, device: torch.device | str) -> dict:
    """Rewards for evaluation from the registry (`eval.rewards`), with `eval.reward_checkpoints` and
    `eval.reward_options` (reward name -> {option: value}) as `prefalign score` takes them."""
    from prefalign.rewards.registry import load

    ev = config["eval"]
    return {name: load(name, ev.get("reward_checkpoints") or None, device, per_reward=ev.get("reward_options"))
            for name in ev["rewards"]}


def load_training_reward(section: Mapping, device: torch.device | str):
    """The frozen reward a trainer optimises, from its `reward` section: `spec` (a registry name or a weighted sum),
    `checkpoints` (reward name -> path) and `options` (reward name -> {option: value})."""
    from prefalign.rewards.registry import load

    reward = load(section["spec"], section.get("checkpoints") or None, device, per_reward=section.get("options"))
    return reward.requires_grad_(False)


@torch.no_grad()
def evaluate(model, prompts: Sequence[str], rewards: dict, ev: dict, accelerator=None) -> dict[str, float] | None:
    """Sample `samples_per_prompt` images per held-out prompt (DDIM + CFG, seeds eval.seed + i, so every model
    sees the same noise) and score them: per reward the mean and 95 % bootstrap CI over prompts. With
    `accelerator`, every process samples a share of the batches and the main process scores them all (None
    elsewhere): the same batches, hence the same images, as one process."""
    k = ev["samples_per_prompt"]
    repeated = [p for p in prompts for _ in range(k)]
    groups = [i for i in range(len(prompts)) for _ in range(k)]
    seeds = [ev["seed"] + i for i in range(len(repeated))]
    size = ev["batch_size"]

    def sample(i: int) -> torch.Tensor:
        return sample_images(model, repeated[i : i + size], seeds[i : i + size], ev["steps"], ev["guidance"],
                             ev["eta"]).cpu()

    batches = spread_calls(sample, range(0, len(repeated), size), accelerator)
    return None if batches is None else reward_table(torch.cat(batches), repeated, rewards, groups)


@torch.no_grad()
def reward_table(images: torch.Tensor, prompts: Sequence[str], rewards: Mapping, groups: Sequence[int] | None = None
                 ) -> dict[str, float]:
    """Mean and 95 % bootstrap CI of each reward; samples sharing a `groups` id (e.g. a prompt index) are averaged
    first, so the interval is over prompts, not over correlated samples of one prompt."""
    groups = torch.as_tensor(list(groups) if groups is not None else range(len(prompts)))
    table: dict[str, float] = {}
    for name, reward in rewards.items():
        scores = reward.score(images.cpu(), list(prompts)).float().cpu()
        per_group = [float(scores[groups == g].mean()) for g in groups.unique(sorted=True)]
        ci = bootstrap_ci(per_group)
        table.update({name: ci.mean, f"{name}_lo": ci.low, f"{name}_hi": ci.high})
    return table


def run_demo_policy_stage(ctx, name: str, label: str, config: dict, train: Callable) -> Path:
    """A `prefalign demo` stage of a multi-step trainer: `train(config)` on the demo's teacher in `ctx.run_dir/name`,
    its result registered as generator `label`, sampled like the teacher (the demo's sampler and CFG)."""
    from prefalign.runs import start_run
    from prefalign.shapes.generators import teacher_source

    sampler, teacher = ctx.config["sampler"], ctx.config["teacher"]
    config, run_dir = start_run(config, None, [], seed=ctx.config["seed"], device=str(ctx.device),
                                out=str(ctx.run_dir / name), model=f"shapes-teacher:{teacher}" if teacher else None)
    model_dir = train(config, run_dir, log=ctx.log)
    source = teacher_source(model_dir, ctx.device, sampler["steps"], sampler["guidance"], sampler["eta"])
    ctx.generators[label] = source
    ctx.artifacts[name] = model_dir
    return model_dir
