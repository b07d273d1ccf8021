"""Headroom of a learned reward on the shipped teacher: how often it agrees with the oracle within one prompt's
samples, and how much best-of-n selection by it lifts the oracle (the ceiling that reward-driven trainers chase).

    OMP_NUM_THREADS=1 python benchmarks/reward_best_of_n.py [--reward shapes-clip] [--prompts 64] [--n 4]

n teacher samples (DDIM 20, CFG 3, seeds 0..) for each of the first `--prompts` shapes-train prompts; pairs whose
oracle scores differ by less than `--margin` are left out of the agreement.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from prefalign.rewards.registry import load
from prefalign.shapes.generators import teacher_source
from prefalign.shapes.prompts import prompt_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="shapes-clip")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--margin", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts = [p for p in prompt_set("train")[: args.prompts] for _ in range(args.n)]
    images = teacher_source(None, "cpu", 20, 3.0)(prompts, list(range(len(prompts))))
    oracle = load("shapes-oracle", None, "cpu").score(images, prompts).view(args.prompts, args.n)
    reward = load(args.reward, None, "cpu").score(images, prompts).view(args.prompts, args.n)
    pairs = [(i, a, b) for i in range(args.prompts) for a, b in itertools.combinations(range(args.n), 2)
             if abs(oracle[i, a] - oracle[i, b]) >= args.margin]
    agree = sum(bool((oracle[i, a] > oracle[i, b]) == (reward[i, a] > reward[i, b])) for i, a, b in pairs)
    by_reward = oracle.gather(1, reward.argmax(1, keepdim=True)).mean()
    print(f"{args.reward} agrees with the oracle on {agree / len(pairs):.3f} of {len(pairs)} within-prompt pairs "
          f"(|Δ oracle| ≥ {args.margin}); oracle: mean {oracle.mean():.3f}, best-of-{args.n} by {args.reward} "
          f"{by_reward:.3f}, best-of-{args.n} by the oracle {oracle.max(1).values.mean():.3f}")


if __name__ == "__main__":
    main()
