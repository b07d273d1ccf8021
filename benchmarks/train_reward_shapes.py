"""The step-aware preference model in the shapes world: held-out accuracy per timestep bucket against the oracle's
noiseless preference, next to the label-noise ceiling; training speed and peak memory on CPU.

Two stages, as SPO builds its step-aware model on PickScore (configs/train_reward_shapes.yaml):
 1. "clean": shapes-clip fine-tuned as a PickScore-like preference model on clean image pairs;
 2. "step_aware": the same backbone with adaLN timestep conditioning, initialised from stage 1 (identical at
    init), trained on pairs noised to t ~ U{0..999} with shared noise and denoised in one CFG step by the teacher.
Both are evaluated on the same 500 held-out pairs at t ∈ {0, 250, 500, 750, 950}, with the same noise; the clean
model scores the teacher's x̂0 without knowing t (the baseline SPO's step-aware model improves on).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/train_reward_shapes.py --out runs/bench_reward
    python benchmarks/train_reward_shapes.py --out runs/bench_reward --report   # table only

Accuracy excludes pairs whose noiseless label is a tie. The ceiling is `label_noise_ceiling` of the same held-out
pairs: the expected agreement of the simulated (noisy) labels with the noiseless preference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train_reward_shapes.yaml"
BUCKETS = (0, 250, 500, 750, 950)
# Throughput runs: 30 training steps of batch 32 with a negligible final evaluation (8 pairs, t = 0 only).
SPEED = ["train.steps=30", "eval.every=30", "data.val_limit=8", "eval.timesteps=[0]", "train.checkpoint_every=30"]
STAGES = {  # overrides of configs/train_reward_shapes.yaml per stage
    "clean": ["model.time_conditioned=false", "train.steps=1000", "train.lr=1e-3", "train.warmup_steps=50",
              "eval.every=1000", "train.checkpoint_every=500"],
    "step_aware": [],
}


def make_data(out: Path, n_train: int, n_val: int) -> Path:
    """The pairs the config's `shapes:web?n=N&seed=0` source would generate (train seed 0, validation seed
    10,000), written once so both stages read the same files."""
    from prefalign.shapes.labels import make_preference_dataset

    data = out / "data"
    if not (data / "validation.parquet").exists():
        make_preference_dataset(data, n_train, seed=0, split="train")
        make_preference_dataset(data, n_val, seed=10_000, split="validation")
    return data


def run_stage(out: Path, name: str, data: Path, extra: list[str], speed: bool = False) -> None:
    run_dir = out / (f"speed_{name}" if speed else name)
    if (run_dir / "summary.json").exists():
        return
    init = [f"model.init_from={out / 'clean' / 'scorer'}"] if name == "step_aware" else []
    cmd = [sys.executable, "-m", "prefalign.cli", "train-reward", "--config", str(CONFIG), "--out", str(run_dir),
           f"data.source={data}", *STAGES[name], *init, *extra, *(SPEED if speed else [])]
    if (run_dir / "checkpoint.pt").exists():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PREFALIGN_NO_PROGRESS": "1"}
    with (out / f"{run_dir.name}.log").open("a") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)


def report(out: Path) -> str:
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in STAGES
                 if (out / name / "summary.json").exists()}
    if not summaries:
        return "no finished stage found"
    ceiling = next(iter(summaries.values()))["label_noise_ceiling"]
    lines = ["| t | clean model: acc vs noiseless | step-aware: acc vs noiseless | step-aware: acc vs noisy labels "
             "| label-noise ceiling |", "|---|---|---|---|---|"]
    for t in BUCKETS:
        cells = [summaries.get(name, {}).get("final", {}).get(key) for name, key in
                 (("clean", f"acc_true_t{t}"), ("step_aware", f"acc_true_t{t}"), ("step_aware", f"acc_t{t}"))]
        lines.append(f"| {t} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + f" | {ceiling:.3f} |")
    decided = int((pd.read_parquet(out / "data" / "validation.parquet")["true_label_0"] != 0.5).sum())
    lines += ["", f"{decided} held-out pairs with a decided noiseless label; binomial 95 % half-width at accuracy "
              f"0.8: ±{1.96 * (0.8 * 0.2 / decided) ** 0.5:.3f}."]
    lines += ["", "| run | steps | CPU s (train + eval) | steps per CPU s | steps/s (wall, shared machine) "
              "| peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for name in (*STAGES, *(f"speed_{n}" for n in STAGES)):
        if (out / name / "summary.json").exists():
            s = json.loads((out / name / "summary.json").read_text())
            lines.append(f"| {name} | {s['steps']} | {s['train_cpu_seconds']:.0f} | "
                         f"{s['steps'] / s['train_cpu_seconds']:.2f} | {s['steps_per_second']:.2f} | "
                         f"{s['peak_memory_mb']:.0f} |")
    if "step_aware" in summaries:
        curve = pd.read_csv(out / "step_aware" / "eval.csv")
        lines += ["", "Step-aware training curve (accuracy vs noiseless per bucket):", "",
                  "| step | " + " | ".join(f"t={t}" for t in BUCKETS) + " |", "|---" * (len(BUCKETS) + 1) + "|"]
        lines += [f"| {int(r['step'])} | " + " | ".join(f"{r[f'acc_true_t{t}']:.3f}" for t in BUCKETS) + " |"
                  for _, r in curve.iterrows()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_reward"))
    parser.add_argument("--train-pairs", type=int, default=16000)
    parser.add_argument("--val-pairs", type=int, default=500)
    parser.add_argument("--report", action="store_true", help="print the table of finished stages only")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both stages")
    args = parser.parse_args()
    if not args.report:
        args.out.mkdir(parents=True, exist_ok=True)
        start = time.process_time()
        data = make_data(args.out, args.train_pairs, args.val_pairs)
        print(f"data: {time.process_time() - start:.0f} CPU s", flush=True)
        for name in STAGES:
            run_stage(args.out, name, data, args.overrides)
        for name in STAGES:
            run_stage(args.out, name, data, args.overrides, speed=True)
    text = report(args.out)
    (args.out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
