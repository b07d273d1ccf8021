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
from prefalign.errors import NotBuiltYet, PrefalignError

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


def _not_built(what: str, issue: str) -> None:
    raise NotBuiltYet(f"'{what}' is not built yet ({issue}); nothing was run")


@app.command("train-reward")
@user_errors
def train_reward(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Train a reward model (incl. the step-aware noisy preference model) on pairwise preference data."""
    _not_built("train-reward", "reward training lands with the step-aware preference model")


@app.command()
@user_errors
def align(
    overrides: OverridesArg = None,
    method: Annotated[str, typer.Option("--method", help="dipp, dpo or spo.")] = "dpo",
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Align a diffusion model with preferences: Diff-Instruct++, Diffusion-DPO or SPO."""
    _not_built(f"align --method {method}", "the alignment trainers have not landed")


@app.command()
@user_errors
def bench(
    suite: Annotated[str, typer.Argument(help="Prompt suite: coco-val, parti, drawbench, hps, shapes-val, file:PATH.")],
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Generate with each generator, score with each reward, write leaderboards with confidence intervals."""
    _not_built(f"bench {suite}", "the benchmark harness has not landed")


@app.command()
@user_errors
def generate(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Sample images from a generator (diffusers pipeline, shapes teacher, one-step generator run)."""
    _not_built("generate", "generators land with the benchmark harness and the one-step trainer")


@app.command()
@user_errors
def score(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Score images with reward models (aesthetic, ImageReward, HPSv2, PickScore, CLIPScore, ...)."""
    _not_built("score", "the reward adapters have not landed")


@app.command()
@user_errors
def demo(
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Run the embedded end-to-end demo in the shapes world."""
    _not_built("demo", "the shapes world has not landed")


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
