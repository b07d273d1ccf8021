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
from prefalign.console import DISK_ERRORS, one_line, quiet_third_party_logs
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
ShowConfigOpt = Annotated[
    bool, typer.Option("--show-config", help="Print the resolved config, one documentation line per key, and exit.")
]


def user_errors(func: F) -> F:
    """Turn a PrefalignError, or a write that the disk refuses (full, read-only, no permission), into one line
    on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_third_party_logs()
        try:
            return func(*args, **kwargs)
        except PrefalignError as err:
            typer.echo(f"error: {one_line(str(err))}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:
            if err.errno not in DISK_ERRORS or not err.filename:
                raise
            hint = "free some space or choose an --out you may write to"
            typer.echo(f"error: {one_line(f'cannot use {err.filename} ({err.strerror}); {hint}')}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def resolve(command: str, defaults: dict, schema: Any, config: Path | None, overrides: list[str] | None,
            show: bool, **explicit: Any) -> dict:
    """The command's config, validated against its schema; with --show-config it is printed and the command ends."""
    from prefalign.config import render_config, resolve_config

    resolved = resolve_config(defaults, config, overrides or [], schema=schema, command=command, **explicit)
    if show:
        typer.echo(f"# prefalign {command}: resolved config (defaults <- --config <- key=value <- flags)")
        typer.echo(render_config(resolved, schema))
        raise typer.Exit(0)
    return resolved


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


def _example(command: str) -> str:
    return (f"Example: {command}  --  every config key, its default and meaning: add --show-config "
            "(commented YAML files in configs/)")


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")]
ALIGN_METHODS = ("dpo", "spo", "dipp", "grpo", "refl")


def _run_trainer(command: str, module_name: str, schema: Any, config: Path | None, overrides: list[str] | None,
                 show: bool, **explicit: Any) -> Path:
    """Resolve and validate `<module>.DEFAULTS` with the config file, overrides and flags, then call
    `<module>.train`."""
    import importlib

    from prefalign.runs import start_run

    module = importlib.import_module(module_name)
    resolved = resolve(command, module.DEFAULTS, schema, config, overrides, show, **explicit)
    resolved, run_dir = start_run(resolved, None, None)
    return module.train(resolved, run_dir, log=typer.echo)


@app.command("train-reward", epilog=_example(
    "prefalign train-reward --config configs/train_reward_shapes.yaml --out runs/reward train.steps=1000"))
@user_errors
def train_reward(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    show_config: ShowConfigOpt = False,
) -> None:
    """Train a reward model (incl. the step-aware noisy preference model) on pairwise preference data."""
    from prefalign.schemas import TRAIN_REWARD

    artifact = _run_trainer("train-reward", "prefalign.train.reward", TRAIN_REWARD, config, overrides, show_config,
                            seed=seed, device=device, out=_path(out), resume=resume or None)
    typer.echo(f"reward model written to {artifact}")


@app.command(epilog=_example(
    "prefalign align --method dpo --config configs/align_dpo_shapes.yaml --out runs/dpo train.lr=1e-4"))
@user_errors
def align(
    overrides: OverridesArg = None,
    method: Annotated[str, typer.Option("--method", help="dipp, dpo, grpo, refl or spo.")] = "dpo",
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    show_config: ShowConfigOpt = False,
) -> None:
    """Align a diffusion model with preferences or a reward: Diff-Instruct++ (dipp), Diffusion-DPO (dpo), GRPO
    (grpo: Flow-GRPO / DanceGRPO), ReFL / DRaFT-K (refl) or SPO (spo)."""
    from prefalign import schemas

    if method not in ALIGN_METHODS:
        raise PrefalignError(f"--method '{method}' unknown; use one of {', '.join(ALIGN_METHODS)}")
    artifact = _run_trainer(f"align --method {method}", f"prefalign.train.{method}", getattr(schemas, method.upper()),
                            config, overrides, show_config, seed=seed, device=device, out=_path(out),
                            resume=resume or None)
    typer.echo(f"aligned model written to {artifact}")


@app.command(epilog=_example(
    "prefalign bench shapes-val -g shapes-teacher -r shapes-oracle --num-prompts 16 --out runs/bench"))
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
    show_config: ShowConfigOpt = False,
) -> None:
    """Generate with each generator, score with each reward, write leaderboards with confidence intervals."""
    from prefalign.bench.harness import BENCH_DEFAULTS, run_bench
    from prefalign.rewards.score import parse_checkpoint_flags, parse_option_flags
    from prefalign.schemas import BENCH

    cfg = resolve(
        "bench", BENCH_DEFAULTS, BENCH, config, overrides, show_config, suite=suite, generators=generator or None,
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


@app.command(epilog=_example(
    "prefalign generate -g shapes-teacher --suite shapes-val --num-prompts 8 --out runs/samples"))
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
    show_config: ShowConfigOpt = False,
) -> None:
    """Sample images from a generator (diffusers pipeline, shapes teacher, one-step generator run)."""
    from prefalign.bench.harness import GENERATE_DEFAULTS, run_generate
    from prefalign.schemas import GENERATE

    if prompts is not None:
        if suite is not None:
            raise PrefalignError("give either --prompts FILE or --suite, not both")
        suite = f"file:{prompts}"
    cfg = resolve(
        "generate", GENERATE_DEFAULTS, GENERATE, config, overrides, show_config, generator=generator, suite=suite, prompts=prompt or None,
        num_prompts=num_prompts, samples_per_prompt=samples_per_prompt,
        prompts_file=_path(prompts_file), batch_size=batch_size, seed=seed,
        device=device, out=_path(out),
    )
    result = run_generate(cfg, log=typer.echo)
    typer.echo(f"{sum(result.generated.values())} images generated; all in {result.out / 'images'} "
               f"(list: {result.out / 'images.csv'})")


@app.command(epilog=_example(
    "prefalign score -r shapes-oracle -r shapes-clip --images runs/samples/images --prompts prompts.txt "
    "--out scores.csv"))
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
    show_config: ShowConfigOpt = False,
) -> None:
    """Score images with reward models (aesthetic, ImageReward, HPSv2, PickScore, CLIPScore, ...). No --seed:
    scoring is deterministic."""
    import warnings

    from prefalign.rewards.images import ImageWarning
    from prefalign.rewards.score import (
        SCORE_DEFAULTS,
        parse_checkpoint_flags,
        parse_option_flags,
        score_from_config,
    )
    from prefalign.schemas import SCORE

    cfg = resolve(
        "score",
        SCORE_DEFAULTS,
        SCORE,
        config,
        overrides,
        show_config,
        rewards=reward or None,
        images=images,
        prompts=_path(prompts),
        prompt=prompt,
        checkpoints=parse_checkpoint_flags(checkpoint) if checkpoint else None,
        options=parse_option_flags(option) if option else None,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        out=_path(out),
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


@app.command(epilog=_example("prefalign demo --out runs/demo num_prompts=16 sampler.guidance=3 stages=[leaderboard]"))
@user_errors
def demo(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    show_config: ShowConfigOpt = False,
) -> None:
    """Run the embedded end-to-end demo in the shapes world (shipped teacher → samples → scores → tables, grids)."""
    import torch

    from prefalign.demo import DEMO_DEFAULTS, run_demo
    from prefalign.runs import start_run
    from prefalign.schemas import DEMO

    resolved = resolve("demo", DEMO_DEFAULTS, DEMO, config, overrides, show_config, seed=seed, device=device,
                       out=_path(out))
    resolved, run_dir = start_run(resolved, None, None)
    run_demo(resolved, run_dir, torch.device(resolved["device"]), log=typer.echo)
    typer.echo(f"demo written to {run_dir}: leaderboard/leaderboard.md (and .csv, samples.csv, gallery.html), grids/")


shapes_app = typer.Typer(help="The shapes world: pretrain its teacher, make preference data.", no_args_is_help=True)
app.add_typer(shapes_app, name="shapes")


@shapes_app.command("pretrain", epilog=_example("prefalign shapes pretrain --out runs/teacher train.weighting=min_snr"))
@user_errors
def shapes_pretrain(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    show_config: ShowConfigOpt = False,
) -> None:
    """Pretrain the shapes teacher on web data (defaults reproduce the shipped checkpoint); resumes in --out."""
    from prefalign.runs import start_run
    from prefalign.schemas import PRETRAIN
    from prefalign.train.pretrain import PRETRAIN_DEFAULTS, pretrain_teacher

    resolved = resolve("shapes pretrain", PRETRAIN_DEFAULTS, PRETRAIN, config, overrides, show_config, seed=seed,
                       device=device, out=_path(out))
    resolved, run_dir = start_run(resolved, None, None)
    teacher_dir = pretrain_teacher(resolved, run_dir)
    typer.echo(f"teacher written to {teacher_dir} (metrics: {run_dir / 'metrics.csv'})")


LABELS_DEFAULTS: dict = {
    "seed": 0, "out": None, "n_pairs": 2000, "val_pairs": 500, "temperature": 0.05, "tie_margin": 0.02,
    "source": "web", "group_size": None,
}


@shapes_app.command("labels", epilog=_example("prefalign shapes labels --out runs/labels n_pairs=5000 val_pairs=500"))
@user_errors
def shapes_labels(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    show_config: ShowConfigOpt = False,
) -> None:
    """Write Pick-a-Pic-format train and validation splits with simulated Bradley–Terry labels from the oracle,
    or with group_size=K ranked groups of K images per prompt (no --device: it runs on the CPU)."""
    from prefalign.runs import start_run
    from prefalign.schemas import LABELS
    from prefalign.shapes.labels import make_preference_splits, make_ranked_splits

    cfg = resolve("shapes labels", LABELS_DEFAULTS, LABELS, config, overrides, show_config, seed=seed, out=_path(out))
    cfg, run_dir = start_run(cfg, None, None)
    if cfg["group_size"]:
        for path, n in zip(make_ranked_splits(run_dir, cfg["n_pairs"], cfg["val_pairs"], cfg["group_size"],
                                              cfg["seed"], cfg["temperature"], cfg["tie_margin"], cfg["source"]),
                           (cfg["n_pairs"], cfg["val_pairs"]), strict=False):
            typer.echo(f"{path.stem}: {n} ranked groups of {cfg['group_size']} images written to {path}")
        return
    for info in make_preference_splits(run_dir, cfg["n_pairs"], cfg["val_pairs"], cfg["seed"], cfg["temperature"],
                                       cfg["tie_margin"], cfg["source"]):
        typer.echo(f"{info.split}: {info.n_pairs} pairs written to {info.path} (ties {info.tie_fraction:.1%}, "
                   f"label-noise ceiling {info.label_noise_ceiling:.3f})")


TRAIN_CLIP_DEFAULTS: dict = {"seed": 0, "out": None, "steps": 800}


@shapes_app.command("train-clip", epilog=_example("prefalign shapes train-clip --out runs/shapes-clip steps=800"))
@user_errors
def shapes_train_clip(
    overrides: OverridesArg = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default 800, the shipped model).")]
    = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    show_config: ShowConfigOpt = False,
) -> None:
    """Train, evaluate and save the shapes-clip reward model; the defaults reproduce the shipped checkpoint (no
    --device: it trains on the CPU)."""
    from prefalign.runs import start_run
    from prefalign.schemas import TRAIN_CLIP
    from prefalign.shapes.clip import main as train_clip_main

    cfg = resolve("shapes train-clip", TRAIN_CLIP_DEFAULTS, TRAIN_CLIP, config, overrides, show_config, steps=steps,
                  seed=seed, out=_path(out))
    cfg, run_dir = start_run(cfg, None, None)
    train_clip_main(["--out", str(run_dir), "--steps", str(cfg["steps"]), "--seed", str(cfg["seed"])])


@app.command("rewards")
def list_rewards() -> None:
    """List the rewards (`--reward NAME`; weighted sums such as 0.5*hpsv2.1+aesthetic) and what each loads."""
    from prefalign.rewards import registry

    for name in registry.available():
        doc = (registry._resolve_factory(name).__doc__ or "").strip().split("\n\n")[0]
        typer.echo(f"{name:14} {' '.join(doc.split())}")
    typer.echo("\nLocal checkpoints: --checkpoint NAME=PATH (score, bench) or eval.reward_checkpoints (trainers).")


@app.command("generators")
def list_generators() -> None:
    """List the generator kinds of `bench -g` / `generate -g` and their options."""
    from prefalign.bench import generators

    typer.echo(f"kinds: {', '.join(generators.generator_kinds())}\n")
    typer.echo(generators.__doc__.split("\n", 1)[1].strip())
    options = ", ".join(f"{k} ({t.__name__})" for k, t in generators.SAMPLER_OPTIONS.items())
    typer.echo(f"\nsampler options: {options}, name (str)")


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
