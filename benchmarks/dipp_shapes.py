"""Diff-Instruct++ in the shapes world (issue 7): DI++ one-step vs the teacher (DDIM, best CFG) vs Diff-Instruct
one-step on held-out prompts, and the reward-hacking gap across an α_rew sweep.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/dipp_shapes.py --out runs/dipp_shapes \
        [--alphas 0 1 3 10] [--main-alpha 1] [--steps 300] [--prompts 64] [--samples 3] [dipp overrides key=value]

One generator per α_rew (α_rew = 0 is Diff-Instruct), all with the same config, seed and learned reward
(shapes-clip) otherwise; each is trained in OUT/alpha_<α> (resumable; a finished one is reused). Every source then
draws `samples` images for each of the first `prompts` val prompts (disjoint from the training prompts) with the
same seeds. Reported with 95 % bootstrap CIs over prompts: the oracle (ground truth, never trained on), the learned
reward, diversity (mean pairwise RMS pixel distance between the samples of one prompt), and seconds per image
(one process, one thread). Differences between sources are paired by prompt. Reward hacking: for each α_rew > 0,
the gains over Diff-Instruct as fractions of the way to the ideal renders, g_r = (r_α − r_DI)/(r_ideal − r_DI),
and the gap g_learned − g_oracle (> 0: the learned reward improved more than the truth). Writes OUT/results.md and
OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from prefalign.config import deep_merge, resolve_config
from prefalign.diffusion.one_step import load_generator, one_step_source
from prefalign.io import atomic_save, atomic_write_text
from prefalign.rewards.registry import load as load_reward
from prefalign.runs import start_run
from prefalign.shapes.generators import ideal_renders, teacher_source
from prefalign.shapes.oracle import oracle
from prefalign.shapes.prompts import prompt_set
from prefalign.stats import bootstrap_ci
from prefalign.train import dipp


def train_generators(args, out: Path) -> dict[float, dict]:
    """Train (or reuse) one generator per α_rew; returns their directories and training CPU/wall seconds."""
    runs = {}
    for alpha in args.alphas:
        run_dir = out / f"alpha_{alpha:g}"
        times_path = run_dir / "train_times.json"
        if not times_path.is_file():
            settings = {"out": str(run_dir), "device": "cpu", "resume": True, "seed": args.seed,
                        "reward": {"alpha": alpha}, "eval": {"every": 0},
                        "train": {"steps": args.steps, "batch_size": args.batch_size, "checkpoint_every": 50}}
            config, run_dir = start_run(deep_merge(dipp.DEFAULTS, settings), None, args.overrides)
            cpu, wall = time.process_time(), time.perf_counter()
            dipp.train(config, run_dir)
            atomic_write_text(times_path, json.dumps({"cpu_s": time.process_time() - cpu,
                                                      "wall_s": time.perf_counter() - wall}))
        runs[alpha] = {"dir": run_dir / "generator", **json.loads(times_path.read_text())}
    return runs


def draw(name: str, source, prompts: list[str], samples: int, cache: Path) -> tuple[torch.Tensor, float]:
    """Images of every (prompt, sample) and seconds per image; cached as uint8 so a rerun only rescores."""
    path = cache / f"{name.replace(' ', '_').replace('=', '')}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["images"].float() / 255, float(saved["seconds"])
    batch = [p for p in prompts for _ in range(samples)]
    start = time.perf_counter()
    images = source(batch, list(range(len(batch)))).clamp(0, 1)
    seconds = (time.perf_counter() - start) / len(batch)
    quantised = (images * 255).round().to(torch.uint8)
    atomic_save(path, lambda p: torch.save({"images": quantised, "seconds": torch.tensor(seconds)}, p))
    return quantised.float() / 255, seconds


def per_prompt_scores(images: torch.Tensor, prompts: list[str], samples: int, learned) -> dict[str, np.ndarray]:
    """Oracle, learned reward and diversity, one value per prompt."""
    batch = [p for p in prompts for _ in range(samples)]
    diversity = [dipp.sample_diversity(images[i * samples:(i + 1) * samples], [0] * samples)
                 for i in range(len(prompts))]
    return {"oracle": oracle(images, batch).view(len(prompts), samples).mean(1).numpy(),
            "learned": learned.score(images, batch, batch_size=64).view(len(prompts), samples).mean(1).numpy(),
            "diversity": np.asarray(diversity)}


def ci(values) -> dict:
    c = bootstrap_ci(values)
    return {"mean": c.mean, "lo": c.low, "hi": c.high}


def fmt(c: dict, digits: int = 3) -> str:
    return f"{c['mean']:.{digits}f} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    parser.add_argument("--main-alpha", type=float, default=1.0, help="the α_rew reported as DI++")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=64, help="first N val prompts (held out from training)")
    parser.add_argument("--samples", type=int, default=3, help="images per prompt")
    parser.add_argument("--teacher-steps", type=int, default=25)
    parser.add_argument("--teacher-cfg", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--tuned-on", type=int, default=32,
                        help="val prompts 0..N-1 were used to tune the defaults; comparisons are repeated without them")
    parser.add_argument("overrides", nargs="*", help="dipp config overrides key=value")
    args = parser.parse_args()
    if 0.0 not in args.alphas or args.main_alpha not in args.alphas:
        parser.error("--alphas must include 0 (Diff-Instruct) and --main-alpha")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = train_generators(args, args.out)

    prompts, k, cache = list(prompt_set("val")[: args.prompts]), args.samples, args.out / "images"
    reward_config = resolve_config(dipp.DEFAULTS, None, args.overrides)["reward"]
    learned = load_reward(reward_config["spec"], reward_config.get("checkpoints") or None)
    sources = {"ideal render": (ideal_renders, None)}
    for cfg in args.teacher_cfg:
        nfe = args.teacher_steps * (1 if cfg == 1 else 2)
        sources[f"teacher DDIM {args.teacher_steps} CFG {cfg:g}"] = (teacher_source(None, "cpu", args.teacher_steps,
                                                                                      cfg), nfe)
    for alpha, run in runs.items():
        model, meta = load_generator(run["dir"])
        name = "Diff-Instruct" if alpha == 0 else f"DI++ α_rew={alpha:g}"
        sources[name] = (one_step_source(model, meta["t_init"]), 1)
    results = {}
    for name, (source, nfe) in sources.items():
        images, seconds = draw(name, source, prompts, k, cache)
        results[name] = {"nfe": nfe, "seconds": seconds, **per_prompt_scores(images, prompts, k, learned)}
        print(f"{name}: oracle {results[name]['oracle'].mean():.3f}", flush=True)

    teachers = [n for n in results if n.startswith("teacher")]
    best_teacher = max(teachers, key=lambda n: results[n]["oracle"].mean())
    main_name, di = f"DI++ α_rew={args.main_alpha:g}", "Diff-Instruct"
    lines = [f"{args.prompts} val prompts × {k} samples (seeds 0..{args.prompts * k - 1}); generators: "
             f"{args.steps} steps × batch {args.batch_size}, seed {args.seed}; learned reward "
             f"{learned.name}; 95 % bootstrap CIs over prompts.", "",
             "| source | NFE | oracle | learned reward | diversity | s / image | training CPU-s |",
             "|---|---|---|---|---|---|---|"]
    summary: dict = {"sources": {}, "best_teacher": best_teacher}
    for name, r in results.items():
        alpha = next((a for a, run in runs.items() if name == ("Diff-Instruct" if a == 0 else f"DI++ α_rew={a:g}")),
                     None)
        train_cpu = f"{runs[alpha]['cpu_s']:.0f}" if alpha is not None else ""
        row = {key: ci(r[key]) for key in ("oracle", "learned", "diversity")}
        summary["sources"][name] = {**row, "nfe": r["nfe"], "seconds": r["seconds"]}
        lines.append(f"| {name} | {r['nfe'] or ''} | {fmt(row['oracle'])} | {fmt(row['learned'], 2)} | "
                     f"{fmt(row['diversity'])} | {r['seconds']:.4f} | {train_cpu} |")

    def paired(a: str, b: str, key: str = "oracle", first: int = 0) -> dict:
        return ci(results[a][key][first:] - results[b][key][first:])

    checks = {}
    for first in (0, args.tuned_on):
        where = "" if first == 0 else f" (prompts {first}..{args.prompts - 1} only)"
        checks |= {f"oracle: {main_name} − {best_teacher}{where}": paired(main_name, best_teacher, first=first),
                   f"oracle: {main_name} − {di}{where}": paired(main_name, di, first=first),
                   f"learned: {main_name} − {di}{where}": paired(main_name, di, "learned", first)}
    speedup = results[best_teacher]["seconds"] / results[main_name]["seconds"]
    diversity_ratio = results[main_name]["diversity"].mean() / results[best_teacher]["diversity"].mean()
    lines += ["", "| comparison (paired by prompt) | difference [95 % CI] |", "|---|---|"]
    lines += [f"| {k_} | {fmt(v)} |" for k_, v in checks.items()]
    lines += ["", f"Speed: {main_name} {speedup:.1f}× faster per image than {best_teacher}. Diversity: "
              f"{main_name} / {best_teacher} = {diversity_ratio:.2f}.", "",
              "Reward hacking across α_rew (gains over Diff-Instruct as fractions of the way to ideal renders):", "",
              "| α_rew | learned gain | oracle gain | gap = learned − oracle [95 % CI] |", "|---|---|---|---|"]
    ideal = results["ideal render"]
    span = {key: ideal[key].mean() - results[di][key].mean() for key in ("oracle", "learned")}
    hacking = {}
    for alpha in sorted(a for a in runs if a > 0):
        r = results[f"DI++ α_rew={alpha:g}"]
        gain = {key: (r[key] - results[di][key]) / span[key] for key in ("oracle", "learned")}
        hacking[alpha] = {"learned": ci(gain["learned"]), "oracle": ci(gain["oracle"]),
                          "gap": ci(gain["learned"] - gain["oracle"])}
        lines.append(f"| {alpha:g} | {fmt(hacking[alpha]['learned'])} | {fmt(hacking[alpha]['oracle'])} | "
                     f"{fmt(hacking[alpha]['gap'])} |")
    summary["per_prompt"] = {name: {key: r[key].tolist() for key in ("oracle", "learned", "diversity")}
                             for name, r in results.items()}
    summary |= {"checks": checks, "speedup": speedup, "diversity_ratio": diversity_ratio, "hacking": hacking,
                "args": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()}}
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out / "results.md", text)
    atomic_write_text(args.out / "results.json", json.dumps(summary, indent=2, default=float))
    print(text)


if __name__ == "__main__":
    main()
