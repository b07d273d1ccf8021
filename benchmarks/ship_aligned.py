"""Pack runs of the trainer benchmark into the aligned checkpoints shipped with the package
(`prefalign/assets/shapes_aligned/<name>/`, read by `prefalign.shapes.aligned` and `prefalign demo`).

Which run of an arm is shipped: among its training seeds, the one whose kept evaluation (`eval.keep_best`, scored
on shapes-train prompts) is highest; an arm evaluated on other prompts ships seed 0. No held-out prompt takes part
in the choice. The packed model (int8 UNet update against the teacher) is then unpacked, sampled and scored on the
benchmark's held-out prompts (shapes-val 128–199, 4 samples from seeds 10,000 + i, as `trainers_shapes.py`), and
those numbers, paired against the teacher's, go into `aligned.json`.

    python benchmarks/ship_aligned.py --out runs/trainers --ship dpo=dpo-720 spo=spo dipp=dipp-1500 \
        diff-instruct=diff-instruct
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainers_shapes import ARMS, HELD_OUT, ONE_STEP, SAMPLE_SEED, held_out_scores

from prefalign.io import atomic_write_text
from prefalign.stats import bootstrap_ci

TITLES = {"dpo": "Diffusion-DPO", "spo": "SPO", "dipp": "DI++ (one step)", "grpo": "GRPO", "refl": "ReFL"}


def mean_ci(values) -> list[float]:
    """[mean, 95 % low, 95 % high] of `values` (bootstrap over prompts)."""
    c = bootstrap_ci(values)
    return [c.mean, c.low, c.high]


def chosen_seed(out: Path, arm: str, seeds: list[int]) -> tuple[int, str]:
    """(seed, how it was chosen): the best kept training-prompt evaluation, else seed 0."""
    runs = {s: out / arm / f"seed{s}" for s in seeds if (out / arm / f"seed{s}" / "config.yaml").is_file()}
    if not runs:
        raise SystemExit(f"{out / arm}: no finished runs of seeds {seeds}")
    configs = {s: yaml.safe_load((r / "config.yaml").read_text()) for s, r in runs.items()}
    if all(c["eval"].get("keep_best") and c["eval"]["prompts"] == "shapes-train" for c in configs.values()):
        best = {s: float(pd.read_csv(r / "eval.csv")["shapes-oracle"].max()) for s, r in runs.items()}
        seed = max(best, key=best.get)
        return seed, ("the highest kept oracle on 64 shapes-train prompts among seeds " +
                      ", ".join(f"{s}: {v:.3f}" for s, v in best.items()))
    return min(runs), "seed 0 (this arm evaluated on no training prompts)"


def ship(out: Path, name: str, arm: str, seeds: list[int], samples: int, rewards: dict) -> dict:
    from prefalign.diffusion.models import DiffusionModel
    from prefalign.diffusion.one_step import load_generator
    from prefalign.shapes.aligned import SHIPPED_ALIGNED, aligned_source, save_aligned

    seed, rule = chosen_seed(out, arm, seeds)
    run_dir = out / arm / f"seed{seed}"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if arm in ONE_STEP:
        model, one_step = load_generator(run_dir)
        sampler = {"one_step": float(one_step["t_init"])}
    else:
        model, sampler = DiffusionModel.from_pretrained(run_dir / "model"), {"steps": 20, "guidance": 3.0}
    method, _, settings, _ = ARMS[arm]
    meta = {"name": name, "method": method, "title": TITLES.get(method, method) if name != "diff-instruct"
            else "Diff-Instruct (one step)", "sampler": sampler,
            "arm": arm, "seed": seed, "chosen": rule,
            "made_by": f"benchmarks/trainers_shapes.py arm {arm}: configs/{ARMS[arm][1]}"
                       + (f" with {' '.join(settings)}" if settings else "") + f", training seed {seed}",
            "train": {k: config["train"][k] for k in ("steps", "lr", "batch_size") if k in config["train"]}}
    folder = SHIPPED_ALIGNED / name
    shutil.rmtree(folder, ignore_errors=True)
    save_aligned(model, folder, meta)
    scored = out / "shipped" / name
    shutil.rmtree(scored, ignore_errors=True)  # the packed model is new: sample it afresh
    scored.mkdir(parents=True)
    source, _ = aligned_source(folder)
    packed = held_out_scores(scored, source, rewards, samples)
    original = held_out_scores(run_dir, None, rewards, samples)
    teacher = held_out_scores(out / "base", None, rewards, samples)
    oracle = np.asarray(packed["shapes-oracle"])

    meta["held_out"] = {
        "prompts": f"shapes-val {HELD_OUT.start}-{HELD_OUT.stop - 1}", "samples_per_prompt": samples,
        "sample_seeds": f"{SAMPLE_SEED} + i",
        "oracle": mean_ci(oracle), "teacher_oracle": mean_ci(teacher["shapes-oracle"]),
        "oracle_minus_teacher": mean_ci(oracle - np.asarray(teacher["shapes-oracle"])),
        "packed_minus_unpacked": float((oracle - np.asarray(original["shapes-oracle"])).mean()),
        # every training seed of the arm (unpacked), so a lucky seed cannot pass for the arm
        "arm_oracle_per_seed": {str(s): float(np.mean(json.loads((out / arm / f"seed{s}" / "heldout.json").read_text())
                                                     ["shapes-oracle"])) for s in seeds
                                if (out / arm / f"seed{s}" / "heldout.json").is_file()},
    }
    atomic_write_text(folder / "aligned.json", json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the trainer benchmark's output directory")
    parser.add_argument("--ship", nargs="+", required=True, metavar="NAME=ARM")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from prefalign.rewards.registry import load

    rewards = {"shapes-oracle": load("shapes-oracle")}
    for item in args.ship:
        name, arm = item.split("=")
        meta = ship(args.out, name, arm, args.seeds, args.samples, rewards)
        h = meta["held_out"]
        print(f"{name}: {meta['made_by']}; chosen by {meta['chosen']}; held-out oracle {h['oracle'][0]:.3f} "
              f"[{h['oracle'][1]:.3f}, {h['oracle'][2]:.3f}], teacher {h['teacher_oracle'][0]:.3f}, paired Δ "
              f"{h['oracle_minus_teacher'][0]:+.3f} [{h['oracle_minus_teacher'][1]:+.3f}, "
              f"{h['oracle_minus_teacher'][2]:+.3f}]; packed − unpacked {h['packed_minus_unpacked']:+.4f}")


if __name__ == "__main__":
    main()
