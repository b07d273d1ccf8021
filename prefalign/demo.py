"""`prefalign demo`: the embedded end-to-end run in the shapes world, as a list of stages.

Each stage is a function of a `DemoContext`; it reads what earlier stages left in `ctx.results`/`ctx.generators`
and writes its own files into the run directory. Later capabilities (reward training, alignment, leaderboards)
add a stage to `STAGES` and, where they produce a generator, register it in `ctx.generators`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torchvision.utils import make_grid, save_image

from prefalign.io import atomic_path, atomic_write_text
from prefalign.rewards import load as load_reward
from prefalign.shapes.generators import ImageSource, ideal_renders, teacher_source, web_data_images
from prefalign.shapes.prompts import prompt_set
from prefalign.stats import bootstrap_ci

DEMO_DEFAULTS: dict = {
    "seed": 0,
    "device": "auto",
    "out": "runs/demo",
    "teacher": None,  # a teacher pipeline directory; None = the checkpoint shipped with prefalign
    "num_prompts": 24,
    "samples_per_prompt": 4,
    "sampler": {"steps": 25, "guidance": 3.0, "eta": 0.0},
    "rewards": ["shapes-oracle", "shapes-clip"],
    "stages": ["baseline", "leaderboard"],
}

@dataclass
class DemoContext:
    config: dict
    run_dir: Path
    device: torch.device
    prompts: list[str]
    generators: dict[str, ImageSource] = field(default_factory=dict)
    results: dict[str, pd.DataFrame] = field(default_factory=dict)
    log: Callable[[str], None] = print


def stage_baseline(ctx: DemoContext) -> None:
    """Sample the teacher on held-out prompts; score it beside ideal renders and web data (the pretraining data)."""
    sampler = ctx.config["sampler"]
    teacher = teacher_source(ctx.config["teacher"], ctx.device, sampler["steps"], sampler["guidance"], sampler["eta"])
    ctx.generators.update({"teacher": teacher, "ideal render": ideal_renders, "web data": web_data_images})
    ctx.results["baseline"] = evaluate_generators(ctx, list(ctx.generators))


def evaluate_generators(ctx: DemoContext, names: list[str]) -> pd.DataFrame:
    """Generate `samples_per_prompt` images per prompt with each named generator, score them with every reward,
    write per-sample scores, the summary table (CSV + markdown) and one PNG grid per prompt."""
    k = ctx.config["samples_per_prompt"]
    prompts = [p for p in ctx.prompts for _ in range(k)]
    seeds = [ctx.config["seed"] * 1_000_000 + i for i in range(len(prompts))]
    rewards = {name: load_reward(name, device=ctx.device) for name in ctx.config["rewards"]}
    rows, images = [], {}
    for name in names:
        start = time.perf_counter()
        images[name] = ctx.generators[name](prompts, seeds)
        seconds = (time.perf_counter() - start) / len(prompts)
        scores = {r: model.score(images[name].to(ctx.device), prompts).cpu() for r, model in rewards.items()}
        for i, prompt in enumerate(prompts):
            rows.append({"generator": name, "prompt": prompt, "seed": seeds[i], "seconds_per_image": seconds,
                         **{r: float(s[i]) for r, s in scores.items()}})
        ctx.log(f"  {name}: " + ", ".join(f"{r} {float(s.mean()):.3f}" for r, s in scores.items()))
    samples = pd.DataFrame(rows)
    _write_csv(samples, ctx.run_dir / "samples.csv")
    summary = summarise(samples, list(rewards))
    _write_csv(summary, ctx.run_dir / "summary.csv")
    atomic_write_text(ctx.run_dir / "summary.md", _markdown(summary, rewards, ctx.config))
    _write_grids(ctx.run_dir / "grids", ctx.prompts, images, k)
    return summary


def summarise(samples: pd.DataFrame, reward_names: list[str]) -> pd.DataFrame:
    """One row per generator: per reward the mean over prompts with a 95% bootstrap CI (prompts resampled)."""
    rows = []
    for name, group in samples.groupby("generator", sort=False):
        row = {"generator": name, "seconds_per_image": group["seconds_per_image"].iloc[0]}
        per_prompt = group.groupby("prompt", sort=False)[reward_names].mean()
        for r in reward_names:
            ci = bootstrap_ci(per_prompt[r].to_numpy())
            row.update({r: ci.mean, f"{r}_ci_low": ci.low, f"{r}_ci_high": ci.high})
        rows.append(row)
    return pd.DataFrame(rows)


def _markdown(summary: pd.DataFrame, rewards: dict, config: dict) -> str:
    s = config["sampler"]
    header = ["generator", *rewards, "s / image"]
    lines = [
        "# prefalign demo — shapes world",
        "",
        f"{config['num_prompts']} held-out prompts × {config['samples_per_prompt']} seeds; teacher: DDIM "
        f"{s['steps']} steps, CFG {s['guidance']}, η {s['eta']}. Mean over prompts [95% bootstrap CI].",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, row in summary.iterrows():
        cells = [row["generator"], *(f"{row[r]:.3f} [{row[f'{r}_ci_low']:.3f}, {row[f'{r}_ci_high']:.3f}]"
                                     for r in rewards), f"{row['seconds_per_image']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Score conventions: " + "; ".join(f"{n}: {m.convention}" for n, m in rewards.items()), ""]
    return "\n".join(lines)


def _write_grids(directory: Path, prompts: list[str], images: dict[str, torch.Tensor], k: int) -> None:
    """One PNG per prompt: a row per generator, a column per seed, upscaled 4× (nearest) to be viewable."""
    directory.mkdir(parents=True, exist_ok=True)
    for j, prompt in enumerate(prompts):
        rows = torch.cat([imgs[j * k : (j + 1) * k] for imgs in images.values()])
        grid = make_grid(rows, nrow=k, padding=2, pad_value=0.5)
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
        with atomic_path(directory / f"{j:03d}_{prompt.replace(' ', '_')[:80]}.png") as tmp:
            save_image(grid, tmp, format="png")


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def stage_leaderboard(ctx: DemoContext) -> None:
    """The shapes-world leaderboard through the bench harness (`prefalign.bench`) in `leaderboard/`: teacher,
    ideal renders and web data, plus every generator a later stage registered in `ctx.generators` (a source with
    an `nfe` attribute fills the NFE column); win rates against the teacher."""
    from prefalign.bench.generators import resolve_generator, source_generator
    from prefalign.bench.harness import BENCH_DEFAULTS, run_bench
    from prefalign.bench.suites import suite_from_prompts

    sampler, teacher = ctx.config["sampler"], ctx.config["teacher"]
    built = {
        "teacher": {"spec": f"shapes-teacher:{teacher}" if teacher else "shapes-teacher", "steps": sampler["steps"],
                    "cfg": sampler["guidance"], "eta": sampler["eta"]},
        "ideal render": {"spec": "shapes-ideal"},
        "web data": {"spec": "shapes-web"},
    }
    generators = [resolve_generator({**spec, "name": name}) for name, spec in built.items()]
    generators += [source_generator(name, source, getattr(source, "nfe", None))
                   for name, source in ctx.generators.items() if name not in built]
    config = {**BENCH_DEFAULTS, "generators": [g.label for g in generators], "rewards": list(ctx.config["rewards"]),
              "samples_per_prompt": ctx.config["samples_per_prompt"], "seed": ctx.config["seed"],
              "baseline": "teacher", "device": str(ctx.device), "batch_size": 32,
              "out": str(ctx.run_dir / "leaderboard")}
    suite = suite_from_prompts("shapes-val", ctx.prompts, "built-in", f"first {len(ctx.prompts)} prompts")
    ctx.results["leaderboard"] = run_bench(config, ctx.log, generators, suite).leaderboard


STAGES: dict[str, Callable[[DemoContext], None]] = {"baseline": stage_baseline, "leaderboard": stage_leaderboard}


def run_demo(config: dict, run_dir: Path, device: torch.device, log: Callable[[str], None] = print) -> DemoContext:
    """Run the configured stages in order; returns the context with every stage's results."""
    ctx = DemoContext(config, run_dir, device, list(prompt_set("val")[: config["num_prompts"]]), log=log)
    for name in config["stages"]:
        log(f"[demo] stage {name}")
        STAGES[name](ctx)
    return ctx
