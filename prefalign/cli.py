"""The `prefalign` command line. Each command resolves its config, then calls one library function.

Errors the user can fix are `PrefalignError`s: printed as one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from prefalign import __version__
from prefalign.errors import PrefalignError

app = typer.Typer(
    name="prefalign",
    help="Measure and improve how well text-to-image diffusion models match human preferences.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

# Options every command shares (typer reads the Annotated metadata).
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config file; CLI values override it.")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Config overrides as key=value (dotted keys for nested fields).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output run directory (resolved config saved here).")]


def user_errors(func: F) -> F:
    """Turn a PrefalignError into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PrefalignError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"prefalign {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Reward adapters, reward training, alignment trainers and a benchmark harness for text-to-image diffusion."""


def _path(value: Path | None) -> str | None:
    return str(value) if value is not None else None


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")]
ALIGN_METHODS = ("dpo", "spo", "dipp")


def _run_trainer(module_name: str, config: Path | None, overrides: list[str] | None, **explicit: Any) -> Path:
    """Resolve `<module>.DEFAULTS` with the config file, overrides and flags, then call `<module>.train`."""
    import importlib

    from prefalign.runs import start_run

    module = importlib.import_module(module_name)
    resolved, run_dir = start_run(module.DEFAULTS, config, overrides, **explicit)
    return module.train(resolved, run_dir, log=typer.echo)


@app.command("train-reward")
@user_errors
def train_reward(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Train a reward model (incl. the step-aware noisy preference model) on pairwise preference data."""
    artifact = _run_trainer("prefalign.train.reward", config, overrides, seed=seed, device=device, out=_path(out),
                            resume=resume or None)
    typer.echo(f"reward model written to {artifact}")


@app.command()
@user_errors
def align(
    overrides: OverridesArg = None,
    method: Annotated[str, typer.Option("--method", help="dipp, dpo or spo.")] = "dpo",
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Align a diffusion model with preferences: Diff-Instruct++ (dipp), Diffusion-DPO (dpo) or SPO (spo)."""
    if method not in ALIGN_METHODS:
        raise PrefalignError(f"--method '{method}' unknown; use one of {', '.join(ALIGN_METHODS)}")
    artifact = _run_trainer(f"prefalign.train.{method}", config, overrides, seed=seed, device=device,
                            out=_path(out), resume=resume or None)
    typer.echo(f"aligned model written to {artifact}")


@app.command()
@user_errors
def bench(
    suite: Annotated[
        str,
        typer.Argument(help="Suite: coco-val, parti, drawbench, hps, pickapic-val, shapes-val or file:PATH."),
    ],
    overrides: OverridesArg = None,
    generator: Annotated[
        list[str] | None,
        typer.Option(
            "--generator", "-g",
            help="Generator spec, e.g. shapes-teacher, diffusers:DIR?steps=30&cfg=7.5, a pipeline directory; "
            "repeatable.",
        ),
    ] = None,
    reward: Annotated[
        list[str] | None,
        typer.Option("--reward", "-r", help="Reward name or weighted sum (e.g. hpsv2.1); repeatable."),
    ] = None,
    num_prompts: Annotated[
        int | None, typer.Option("--num-prompts", help="Prompts to use (a seeded subset); default all.")
    ] = None,
    samples_per_prompt: Annotated[
        int | None, typer.Option("--samples-per-prompt", help="Images per prompt (seeds); default 1.")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="Generator label for win rates (default: the first).")
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--captions", "--prompts-file",
            help="The suite's file: captions_val2017.json, PartiPrompts.tsv, DrawBench CSV, HPS folder, "
            "Pick-a-Pic parquet.",
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Images per generator call and reward pass.")
    ] = None,
    checkpoint: Annotated[
        list[str] | None,
        typer.Option("--checkpoint", help="NAME=PATH: local checkpoint for a reward; repeatable."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="NAME.KEY=VALUE reward adapter option; repeatable."),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Reward dtype: float32, bfloat16 or float16.")
    ] = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Generate with each generator, score with each reward, write leaderboards with confidence intervals."""
    from prefalign.bench.harness import BENCH_DEFAULTS, run_bench
    from prefalign.config import resolve_config
    from prefalign.rewards.score import parse_checkpoint_flags, parse_option_flags

    cfg = resolve_config(
        BENCH_DEFAULTS, config, overrides or [], suite=suite, generators=generator or None,
        rewards=reward or None, num_prompts=num_prompts, samples_per_prompt=samples_per_prompt,
        baseline=baseline, prompts_file=_path(prompts_file), batch_size=batch_size,
        checkpoints=parse_checkpoint_flags(checkpoint) if checkpoint else None,
        options=parse_option_flags(option) if option else None, dtype=dtype, seed=seed, device=device,
        out=_path(out),
    )
    result = run_bench(cfg, log=typer.echo)
    if result.leaderboard is not None:
        typer.echo(f"leaderboard written to {result.out} (leaderboard.md, leaderboard.csv, samples.csv, "
                   "gallery.html, leaderboard.png)")


@app.command()
@user_errors
def generate(
    overrides: OverridesArg = None,
    generator: Annotated[
        str | None,
        typer.Option("--generator", "-g", help="Generator spec, e.g. diffusers:DIR?steps=30."),
    ] = None,
    suite: Annotated[
        str | None, typer.Option("--suite", help="Prompt suite (as in `bench`); or give --prompt.")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeatable.")] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="A prompt file (txt/csv/tsv/json/jsonl/parquet); = --suite file:F.")
    ] = None,
    num_prompts: Annotated[
        int | None, typer.Option("--num-prompts", help="Prompts of the suite to use.")
    ] = None,
    samples_per_prompt: Annotated[
        int | None, typer.Option("--samples-per-prompt", help="Images per prompt (seeds); default 1.")
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--captions", "--prompts-file", help="The suite's file (see `bench`).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per generator call.")] = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Sample images from a generator (diffusers pipeline, shapes teacher, one-step generator run)."""
    from prefalign.bench.harness import GENERATE_DEFAULTS, run_generate
    from prefalign.config import resolve_config

    if prompts is not None:
        if suite is not None:
            raise PrefalignError("give either --prompts FILE or --suite, not both")
        suite = f"file:{prompts}"
    cfg = resolve_config(
        GENERATE_DEFAULTS, config, overrides or [], generator=generator, suite=suite, prompts=prompt or None,
        num_prompts=num_prompts, samples_per_prompt=samples_per_prompt,
        prompts_file=_path(prompts_file), batch_size=batch_size, seed=seed,
        device=device, out=_path(out),
    )
    result = run_generate(cfg, log=typer.echo)
    typer.echo(f"{sum(result.generated.values())} images generated; all in {result.out / 'images'} "
               f"(list: {result.out / 'images.csv'})")


@app.command()
@user_errors
def score(
    overrides: OverridesArg = None,
    reward: Annotated[
        list[str] | None,
        typer.Option(
            "--reward", "-r", help="Reward name or weighted sum (e.g. 0.5*hpsv2.1+aesthetic); repeatable."
        ),
    ] = None,
    images: Annotated[
        str | None, typer.Option("--images", help="Image directory, glob pattern or CSV (path[,prompt]).")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Text file, one prompt per image (in image order).")
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="One prompt for every image.")] = None,
    checkpoint: Annotated[
        list[str] | None,
        typer.Option("--checkpoint", help="NAME=PATH: local checkpoint for a reward; repeatable."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", help="NAME.KEY=VALUE adapter option (e.g. pickscore.processor=DIR); repeatable."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per forward pass.")] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float32 (default), bfloat16 or float16.")
    ] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="CSV to write (default scores.csv).")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Image-decoding processes (default 2; 0: none).")
    ] = None,
    fast: Annotated[
        bool | None, typer.Option("--fast/--exact", help="bfloat16 + channels-last: faster, not bit-exact.")
    ] = None,
) -> None:
    """Score images with reward models (aesthetic, ImageReward, HPSv2, PickScore, CLIPScore, ...)."""
    import warnings

    from prefalign.config import resolve_config
    from prefalign.rewards.images import ImageWarning
    from prefalign.rewards.score import (
        SCORE_DEFAULTS,
        parse_checkpoint_flags,
        parse_option_flags,
        score_from_config,
    )

    cfg = resolve_config(
        SCORE_DEFAULTS,
        config,
        overrides or [],
        rewards=reward or None,
        images=images,
        prompts=prompts,
        prompt=prompt,
        checkpoints=parse_checkpoint_flags(checkpoint) if checkpoint else None,
        options=parse_option_flags(option) if option else None,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        out=out,
        workers=workers,
        fast=fast,
    )
    with warnings.catch_warnings():  # image notes are printed below, one line each
        warnings.simplefilter("ignore", ImageWarning)
        report = score_from_config(cfg)
    for note in dict.fromkeys(report.notes):
        typer.echo(f"warning: {note}", err=True)
    for reason in report.failed.values():
        typer.echo(f"skipped {reason}", err=True)
    failed = f"; {len(report.failed)} images failed" if report.failed else ""
    kept = f" (kept {report.kept} from an earlier run)" if report.kept else ""
    typer.echo(f"wrote {report.rows} scores to {report.out}{kept}{failed}")
    if report.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def demo(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Run the embedded end-to-end demo in the shapes world (shipped teacher → samples → scores → tables, grids)."""
    import torch

    from prefalign.demo import DEMO_DEFAULTS, run_demo
    from prefalign.runs import start_run

    resolved, run_dir = start_run(DEMO_DEFAULTS, config, overrides, seed=seed, device=device, out=_path(out))
    run_demo(resolved, run_dir, torch.device(resolved["device"]), log=typer.echo)
    typer.echo(f"demo written to {run_dir}: leaderboard/leaderboard.md (and .csv, samples.csv, gallery.html), grids/")


shapes_app = typer.Typer(help="The shapes world: pretrain its teacher, make preference data.", no_args_is_help=True)
app.add_typer(shapes_app, name="shapes")


@shapes_app.command("pretrain")
@user_errors
def shapes_pretrain(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Pretrain the shapes teacher on web data (defaults reproduce the shipped checkpoint); resumes in --out."""
    from prefalign.runs import start_run
    from prefalign.shapes.pretrain import PRETRAIN_DEFAULTS, pretrain_teacher

    resolved, run_dir = start_run(PRETRAIN_DEFAULTS, config, overrides, seed=seed, device=device, out=_path(out))
    teacher_dir = pretrain_teacher(resolved, run_dir)
    typer.echo(f"teacher written to {teacher_dir} (metrics: {run_dir / 'metrics.csv'})")


LABELS_DEFAULTS: dict = {
    "seed": 0, "out": None, "n_pairs": 2000, "temperature": 0.05, "tie_margin": 0.02, "source": "web",
    "split": "train",
}


@shapes_app.command("labels")
@user_errors
def shapes_labels(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
) -> None:
    """Write a Pick-a-Pic-format preference dataset with simulated Bradley–Terry labels from the oracle."""
    from prefalign.runs import start_run
    from prefalign.shapes.labels import make_preference_dataset

    cfg, run_dir = start_run(LABELS_DEFAULTS, config, overrides, seed=seed, out=_path(out))
    info = make_preference_dataset(run_dir, cfg["n_pairs"], cfg["seed"], cfg["temperature"], cfg["tie_margin"],
                                   cfg["source"], cfg["split"])
    typer.echo(f"{info.n_pairs} pairs written to {info.path} (ties {info.tie_fraction:.1%}, "
               f"label-noise ceiling {info.label_noise_ceiling:.3f})")


@shapes_app.command("train-clip")
@user_errors
def shapes_train_clip(
    steps: Annotated[int, typer.Option("--steps", help="Training steps (800 reproduces the shipped model).")] = 800,
    seed: SeedOpt = None,
    out: OutOpt = None,
) -> None:
    """Train, evaluate and save the shapes-clip reward model; the defaults reproduce the shipped checkpoint."""
    from prefalign.shapes.clip import main as train_clip_main

    if out is None:
        raise PrefalignError("pass --out DIR for the trained shapes-clip checkpoint")
    train_clip_main(["--out", str(out), "--steps", str(steps), "--seed", str(seed or 0)])


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
