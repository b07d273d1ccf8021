"""Min-SNR-5 vs uniform loss weighting, and Laplace logSNR timestep sampling vs uniform t, in the shapes world.

Each arm pretrains the shapes teacher from scratch with identical data, model, seed and budget; only the weighting
or the timestep sampler differs. Every `--eval-every` steps the EMA model is evaluated on held-out web data
(unweighted ε-MSE at fixed t and noise, comparable across arms) and on the oracle score of DDIM samples.

    python benchmarks/shapes_training_claims.py --out runs/bench_claims --steps 1000 --seeds 0 1 --jobs 2
    python benchmarks/shapes_training_claims.py --out runs/bench_claims --report   # table only

Reported: final val loss / oracle per arm (mean ± spread over seeds) and iterations to reach fixed targets.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

# Each arm names its weighting and timestep sampler explicitly (the shipped recipe's defaults may change).
ARMS = {
    "uniform": ["train.weighting=uniform", "train.timesteps.kind=uniform"],
    "min_snr_5": ["train.weighting=min_snr", "train.snr_gamma=5", "train.timesteps.kind=uniform"],
    "laplace": ["train.weighting=uniform", "train.timesteps.kind=laplace", "train.timesteps.loc=0",
                "train.timesteps.scale=0.5"],
}


def run_arm(out: Path, arm: str, seed: int, steps: int, eval_every: int, extra: list[str]) -> Path:
    run_dir = out / f"{arm}_seed{seed}"
    cmd = [
        sys.executable, "-m", "prefalign.cli", "shapes", "pretrain", "--out", str(run_dir), "--seed", str(seed),
        f"train.steps={steps}", f"eval.every={eval_every}", f"checkpoint_every={eval_every}",
        f"train.warmup_steps={min(200, steps // 10)}", *ARMS[arm], *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PREFALIGN_NO_PROGRESS": "1"}
    log = (out / f"{arm}_seed{seed}.log").open("w")
    subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    return run_dir


def first_step_reaching(metrics: pd.DataFrame, column: str, target: float, lower_is_better: bool) -> float:
    hit = metrics[metrics[column] <= target] if lower_is_better else metrics[metrics[column] >= target]
    return float(hit["step"].iloc[0]) if len(hit) else float("nan")


def report(out: Path) -> str:
    runs = {}
    for metrics_file in sorted(out.glob("*_seed*/metrics.csv")):
        arm, seed = metrics_file.parent.name.rsplit("_seed", 1)
        runs[(arm, int(seed))] = pd.read_csv(metrics_file)
    if not runs:
        return "no runs found"
    # Targets: what the uniform baseline reaches at its final evaluation (mean over seeds).
    base = [m for (arm, _), m in runs.items() if arm == "uniform"]
    val_target = float(np.mean([m["val_loss"].iloc[-1] for m in base])) if base else float("nan")
    oracle_target = float(np.mean([m["oracle"].iloc[-1] for m in base])) if base else float("nan")
    lines = [
        f"Targets = the uniform arm's final values: val ε-MSE ≤ {val_target:.4f}, oracle ≥ {oracle_target:.3f}.",
        "",
        "| arm | seeds | final val ε-MSE (mean ± sd) | final oracle (mean ± sd) | steps to val target | steps to oracle target |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        ms = [m for (a, _), m in sorted(runs.items()) if a == arm]
        if not ms:
            continue
        val = np.array([m["val_loss"].iloc[-1] for m in ms])
        orc = np.array([m["oracle"].iloc[-1] for m in ms])
        to_val = [first_step_reaching(m, "val_loss", val_target, True) for m in ms]
        to_orc = [first_step_reaching(m, "oracle", oracle_target, False) for m in ms]
        lines.append(
            f"| {arm} | {len(ms)} | {val.mean():.4f} ± {val.std():.4f} | {orc.mean():.3f} ± {orc.std():.3f} | "
            f"{', '.join(f'{s:.0f}' for s in to_val)} | {', '.join(f'{s:.0f}' for s in to_orc)} |"
        )
    lines += ["", "Per-evaluation curves (val ε-MSE / oracle):", ""]
    for (arm, seed), m in sorted(runs.items()):
        curve = "; ".join(f"{int(r.step)}: {r.val_loss:.4f} / {r.oracle:.3f}" for r in m.itertuples())
        lines.append(f"- {arm} seed {seed}: {curve}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=125)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--jobs", type=int, default=2, help="arms run in parallel, one CPU thread each")
    parser.add_argument("--report", action="store_true", help="only print the table from existing runs")
    parser.add_argument("extra", nargs="*", help="extra key=value overrides for every arm")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda j: run_arm(args.out, *j, args.steps, args.eval_every, args.extra), jobs))
    print(report(args.out))


if __name__ == "__main__":
    main()
