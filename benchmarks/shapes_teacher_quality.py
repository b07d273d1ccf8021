"""Teacher quality in the shapes world: oracle score of teacher samples vs web data vs ideal renders, CFG sweep.

    python benchmarks/shapes_teacher_quality.py [--teacher DIR] [--prompts 64] [--seeds 2] [--steps 25]

Scores are means over held-out prompts (val split) with 95% bootstrap CIs; prompts are the resampling unit.
"""

from __future__ import annotations

import argparse
import time

import torch

from prefalign.shapes.generators import ideal_renders, teacher_source, web_data_images
from prefalign.shapes.oracle import AESTHETIC_WEIGHTS, FIDELITY_WEIGHTS, oracle_breakdown
from prefalign.shapes.prompts import prompt_set
from prefalign.stats import bootstrap_ci

PARTS = [*FIDELITY_WEIGHTS, *AESTHETIC_WEIGHTS]


def evaluate(name: str, source, prompts: list[str], k: int) -> tuple[str, str]:
    """(the summary row, the per-part row: mean of each oracle part where it applies) of one image source."""
    batch_prompts = [p for p in prompts for _ in range(k)]
    seeds = list(range(len(batch_prompts)))
    start = time.perf_counter()
    images = source(batch_prompts, seeds)
    seconds = (time.perf_counter() - start) / len(batch_prompts)
    parts = oracle_breakdown(images, batch_prompts)
    cells = []
    for part in ("score", "fidelity", "aesthetic"):
        per_prompt = parts[part].view(len(prompts), k).mean(1)
        cells.append(str(bootstrap_ci(per_prompt.numpy())))
    part_means = [float(parts[p][~parts[p].isnan()].mean()) for p in PARTS]
    return (f"| {name} | " + " | ".join(cells) + f" | {seconds:.4f} |",
            f"| {name} | " + " | ".join(f"{m:.2f}" for m in part_means) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="teacher pipeline directory (default: shipped)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prompts = list(prompt_set("val")[: args.prompts])
    print(f"{args.prompts} val prompts × {args.seeds} seeds; teacher DDIM {args.steps} steps (η = 0)\n")
    print("| source | oracle [95% CI] | fidelity | aesthetic | s / image |")
    print("|---|---|---|---|---|")
    sources = {"ideal render": ideal_renders, "web data": web_data_images}
    sources |= {f"teacher CFG {g:g}": teacher_source(args.teacher, "cpu", args.steps, g) for g in args.guidance}
    part_rows = []
    for name, source in sources.items():
        row, parts = evaluate(name, source, prompts, args.seeds)
        part_rows.append(parts)
        print(row, flush=True)
    print("\nOracle parts (mean where the part applies):\n")
    print("| source | " + " | ".join(PARTS) + " |")
    print("|---|" + "---|" * len(PARTS))
    print("\n".join(part_rows))


if __name__ == "__main__":
    main()
