"""`prefalign demo`: the embedded end-to-end run in the shapes world, as a list of stages.

Each stage is a function of a `DemoContext`; it reads what earlier stages left in `ctx.results`,
`ctx.artifacts` and `ctx.generators` and writes its own files into the run directory. A trainer's stage lives
beside its trainer (`prefalign.train.<method>.demo_stage`) and registers the generator it produced in
`ctx.generators`, so the final leaderboard stage compares it with the teacher.
"""

from __future__ import annotations

import importlib
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from prefalign.bench.generators import resolve_generator, source_generator
from prefalign.bench.harness import BENCH_DEFAULTS, run_bench
from prefalign.bench.suites import suite_from_prompts
from prefalign.errors import PrefalignError
from prefalign.io import atomic_path
from prefalign.shapes.generators import ImageSource
from prefalign.shapes.prompts import prompt_set
from prefalign.shapes.teacher import load_teacher
from prefalign.stats import bootstrap_ci

DEMO_DEFAULTS: dict = {
    "seed": 0,
    "device": "auto",
    "out": "runs/demo",
    "teacher": None,  # a teacher pipeline directory; None = the checkpoint shipped with prefalign
    # every shapes-val prompt: gains of +0.015 are told from ties (paired 95% CI ≈ ±0.013); 16 prompts could not
    "num_prompts": 200,
    "samples_per_prompt": 2,
    "sampler": {"steps": 20, "guidance": 3.0, "eta": 0.0},  # as the trainers evaluate and the trainer benchmark samples
    "rewards": ["shapes-oracle", "shapes-clip"],
    "stages": ["reward", "dpo", "spo", "dipp", "grpo", "leaderboard"],
    # shipped: the dpo, spo and dipp stages load the small checkpoints the full trainer benchmark made (their
    # demo-scale runs do not beat the teacher); train: those stages train at demo scale
    "checkpoints": "shipped",
}

# Rows a `checkpoints: shipped` stage registers: (leaderboard name, checkpoint in prefalign/assets/shapes_aligned)
SHIPPED_ROWS = {"dpo": [("DPO", "dpo")], "spo": [("SPO", "spo")],
                "dipp": [("DI++", "dipp"), ("Diff-Instruct", "diff-instruct")]}


@dataclass
class DemoContext:
    config: dict
    run_dir: Path
    device: torch.device
    prompts: list[str]
    generators: dict[str, ImageSource] = field(default_factory=dict)
    results: dict[str, pd.DataFrame] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    log: Callable[[str], None] = print


def stage_shipped(ctx: DemoContext, stage: str) -> None:
    """A trainer stage under `checkpoints: shipped`: register the full benchmark's checkpoints of `stage`
    (`SHIPPED_ROWS`), multi-step ones sampled like the teacher, and say where each came from."""
    from prefalign.shapes.aligned import aligned_dir, aligned_source

    for label, name in SHIPPED_ROWS[stage]:
        ctx.artifacts[name] = aligned_dir(name)
        ctx.generators[label], meta = aligned_source(name, ctx.device, sampler=ctx.config["sampler"])
        held_out, delta = meta["held_out"], meta["held_out"]["oracle_minus_teacher"]
        seeds = ", ".join(f"{v:.3f}" for v in held_out["arm_oracle_per_seed"].values())
        ctx.log(f"[demo] {label}: the full benchmark's checkpoint (benchmarks/trainers_shapes.py arm {meta['arm']}, "
                f"training seed {meta['seed']}; prefalign/assets/shapes_aligned/{name}/aligned.json); held-out "
                f"oracle {held_out['oracle'][0]:.3f} vs the teacher's {held_out['teacher_oracle'][0]:.3f}, paired "
                f"{delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]; the arm's training seeds: {seeds}")


def stage_leaderboard(ctx: DemoContext) -> None:
    """The shapes-world leaderboard through the bench harness (`prefalign.bench`) in `leaderboard/`: teacher,
    ideal renders and web data, plus every generator a later stage registered in `ctx.generators` (a source
    with an `nfe` attribute fills the NFE column); win rates against the teacher; a PNG grid per prompt."""
    sampler, teacher = ctx.config["sampler"], ctx.config["teacher"]
    built = {
        "teacher": {"spec": f"shapes-teacher:{teacher}" if teacher else "shapes-teacher",
                    "steps": sampler["steps"], "cfg": sampler["guidance"], "eta": sampler["eta"]},
        "ideal render": {"spec": "shapes-ideal"},
        "web data": {"spec": "shapes-web"},
    }
    generators = [resolve_generator({**spec, "name": name}) for name, spec in built.items()]
    # In-process models have no weights on disk to fingerprint: the demo config that trained them keys the cache.
    trained_by = json.dumps(ctx.config, sort_keys=True, default=str)
    generators += [source_generator(name, source, getattr(source, "nfe", None), fingerprint=trained_by)
                   for name, source in ctx.generators.items() if name not in built]
    config = {
        **BENCH_DEFAULTS, "generators": [g.label for g in generators], "rewards": list(ctx.config["rewards"]),
        "samples_per_prompt": ctx.config["samples_per_prompt"], "seed": ctx.config["seed"], "baseline": "teacher",
        "device": str(ctx.device), "batch_size": 32, "out": str(ctx.run_dir / "leaderboard"),
    }
    suite = suite_from_prompts("shapes-val", ctx.prompts, "built-in", f"first {len(ctx.prompts)} prompts")
    ctx.results["leaderboard"] = board = run_bench(config, ctx.log, generators, suite).leaderboard
    if ctx.generators:
        samples = pd.read_csv(ctx.run_dir / "leaderboard" / "samples.csv")
        ctx.log(verdict_line(samples, board, list(ctx.generators), ctx.config["rewards"][0]))
    write_prompt_grids(ctx.run_dir / "leaderboard", ctx.run_dir / "grids", ctx.config["rewards"][0])


def verdict_line(samples: pd.DataFrame, board: pd.DataFrame, names: list[str], reward: str) -> str:
    """One line: each named row's mean `reward` minus the teacher's, paired by prompt (95% bootstrap CI over
    prompts), and its per-prompt win rate against the teacher from the leaderboard."""
    per_prompt = samples.groupby(["generator", "prompt_index"])[reward].mean().unstack("prompt_index")
    wins = board.set_index("generator")
    parts = []
    for name in names:
        delta = bootstrap_ci(per_prompt.loc[name] - per_prompt.loc["teacher"])
        verdict = ("beats the teacher" if delta.low > 0 else "below the teacher" if delta.high < 0 else
                   f"{'above' if delta.mean > 0 else 'below'} the teacher, CI spans 0")
        win = wins.loc[name, f"win_{reward}"]
        parts.append(f"{name} {delta.mean:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}] {verdict} (wins {win:.0%})")
    return f"[demo] {reward} vs the teacher (mean difference paired by prompt, 95% CI): " + "; ".join(parts)


def write_prompt_grids(bench_dir: Path, out_dir: Path, score: str) -> None:
    """One labelled PNG per prompt from a bench run's `samples.csv`: the prompt on top, a row per generator
    (leaderboard order, named on the left), a column per sample, each image upscaled 4× (nearest) and captioned
    with its `score` column."""
    samples = pd.read_csv(bench_dir / "samples.csv")
    order = list(dict.fromkeys(samples["generator"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=11)  # the scalable built-in font: the bitmap one runs words together
    tile, caption, label_width, title = 128, 14, 140, 22
    for prompt_index, group in samples.groupby("prompt_index", sort=True):
        group = group.assign(rank=group["generator"].map(order.index)).sort_values(["rank", "sample"])
        columns = int(group["sample"].nunique())
        canvas = Image.new("RGB", (label_width + columns * (tile + 4), title + len(order) * (tile + caption + 6)),
                           "white")
        draw = ImageDraw.Draw(canvas)
        prompt = str(group["prompt"].iloc[0])
        draw.text((4, 4), prompt, fill="black", font=font)
        for row, (generator, rows) in enumerate(group.groupby("rank", sort=True)):
            top = title + row * (tile + caption + 6)
            name = order[generator]
            draw.text((4, top + tile // 2 - 12), "\n".join(textwrap.wrap(name, 20)), fill="black", font=font)
            for col, (_, sample) in enumerate(rows.iterrows()):
                left = label_width + col * (tile + 4)
                image = Image.open(bench_dir / sample["image"]).convert("RGB").resize((tile, tile), Image.NEAREST)
                canvas.paste(image, (left, top))
                draw.rectangle((left - 1, top - 1, left + tile, top + tile), outline="gray")
                draw.text((left + 2, top + tile + 1), f"{score} {sample[score]:.2f}", fill="black", font=font)
        name = f"{int(prompt_index):03d}_{prompt.replace(' ', '_')[:80]}.png"
        with atomic_path(out_dir / name) as tmp:
            canvas.save(tmp, format="png")


STAGES: dict[str, Callable[[DemoContext], None] | str] = {
    "reward": "prefalign.train.reward:demo_stage",
    "dpo": "prefalign.train.dpo:demo_stage",
    "spo": "prefalign.train.spo:demo_stage",
    "dipp": "prefalign.train.dipp:demo_stage",
    "grpo": "prefalign.train.grpo:demo_stage",
    "leaderboard": stage_leaderboard,
}


def _stage(name: str, checkpoints: str) -> Callable[[DemoContext], None]:
    """A stage by name; trainer stages are imported only when run (they pull in their trainer's dependencies)."""
    if name not in STAGES:
        raise PrefalignError(f"demo stage '{name}' unknown; stages: {', '.join(STAGES)}")
    if checkpoints == "shipped" and name in SHIPPED_ROWS:
        return lambda ctx: stage_shipped(ctx, name)
    stage = STAGES[name]
    if isinstance(stage, str):
        module, function = stage.split(":")
        stage = getattr(importlib.import_module(module), function)
    return stage


def run_demo(config: dict, run_dir: Path, device: torch.device, log: Callable[[str], None] = print) -> DemoContext:
    """Run the configured stages in order; returns the context with every stage's results."""
    ctx = DemoContext(config, run_dir, device, list(prompt_set("val")[: config["num_prompts"]]), log=log)
    # An unknown name, a wrong teacher path or a mismatch fails before any work.
    stages = {name: _stage(name, config["checkpoints"]) for name in config["stages"]}
    shipped = [name for name in stages if name in SHIPPED_ROWS] if config["checkpoints"] == "shipped" else []
    if config.get("teacher"):
        load_teacher(config["teacher"])
        if shipped:
            raise PrefalignError(f"checkpoints=shipped: the shipped {', '.join(shipped)} checkpoints are updates of "
                                 f"the shipped teacher, not of teacher={config['teacher']}; pass checkpoints=train")
    sampler = config["sampler"]
    rows = [label for name in shipped for label, _ in SHIPPED_ROWS[name]]
    loaded = (f"; rows {', '.join(rows)} load the full benchmark's checkpoints (trained at this scale they do not "
              "beat the teacher; checkpoints=train trains them here)") if rows else ""
    log(f"[demo] scale: {len(ctx.prompts)} shapes-val prompts × {config['samples_per_prompt']} samples, DDIM "
        f"{sampler['steps']} steps, CFG {sampler['guidance']}, stages {', '.join(stages)}{loaded}; full-scale "
        "numbers with 95% CIs: benchmarks/RESULTS.md")
    for name, stage in stages.items():
        log(f"[demo] stage {name}")
        stage(ctx)
    return ctx
