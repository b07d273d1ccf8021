"""Every alignment trainer against the shipped shapes teacher, three training seeds per arm, scored on prompts that
no tuning saw.

    OMP_NUM_THREADS=1 python benchmarks/trainers_shapes.py --out runs/trainers --arms base dpo refl \
        --seeds 0 1 2 --reward-checkpoint runs/step-aware/scorer [--set dpo data.source=DIR ...]
    python benchmarks/trainers_shapes.py --out runs/trainers --report     # tables from finished runs only

Each (arm, seed) is one `prefalign align` run in OUT/<arm>/seed<k> (resumable; a finished run is reused) with the
arm's shipped config, `ARMS`' settings and `--set` overrides. Its periodic evaluation (the first 128 shapes-val
prompts, DDIM 20, CFG 3; `align_shapes.EVAL`) gives the oracle-vs-compute curve used for tuning and for the
compute comparison. The final comparison uses the held-out prompts: shapes-val 128–199, which no curve and no tuning
run ever saw, `--samples` images each from seeds 10,000 + i, every arm sampled as its trainer samples (DDIM 20,
CFG 3; one step for the DI++ / Diff-Instruct generators). Per prompt, the scores are averaged over samples and
seeds; 95 % bootstrap CIs are over prompts, differences are paired by prompt. The reward-hacking gap of an arm is
(gain of the reward it optimised − gain of the oracle), each as a fraction of the teacher → ideal-render span.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align_shapes import LEARNED, REPO, eval_overrides, run_align

from prefalign.io import atomic_save, atomic_write_text
from prefalign.stats import bootstrap_ci

# The longer arms evaluate on training prompts and keep their best evaluation (model selection without the
# held-out prompts; their curves are on these 64 shapes-train prompts, not on the 128 curve prompts).
SELECT = ["eval.prompts=shapes-train", "eval.num_prompts=64", "eval.keep_best=shapes-oracle"]
# arm -> (method, shipped config, settings on top of it, reward the arm optimises)
ARMS = {
    # Pairs of the teacher's own samples (--set dpo data.source=DIR); tuned on 64 shapes-train prompts, seed 1:
    # lr 3e-5 / 240 steps +0.032; lr 1e-4 (the shipped config's) swung by ±0.04 between seeds on the curve prompts
    "dpo": ("dpo", "align_dpo_shapes.yaml", ["train.lr=3e-5", "eval.every=60"], None),
    # the config's lr 3e-5: +0.020 on 64 shapes-train prompts (seed 1); lr 1e-4 lowered the oracle in all 3 seeds
    "spo": ("spo", "align_spo_shapes.yaml", [], LEARNED),
    "dipp": ("dipp", "align_dipp_shapes.yaml", [], "shapes-clip"),
    "diff-instruct": ("dipp", "align_dipp_shapes.yaml", ["reward.alpha=0"], None),
    # one seed on 64 shapes-train prompts, every 300 iterations: 0.363 → 0.661 → 0.751 → 0.769 → 0.673 (teacher 0.773)
    "dipp-1200": ("dipp", "align_dipp_shapes.yaml", ["train.steps=1200", "eval.every=300"], "shapes-clip"),
    # the same with an EMA of the generator (the last iterates above swing by up to 0.11 between checkpoints)
    "dipp-1200-ema": ("dipp", "align_dipp_shapes.yaml", ["train.steps=1200", "eval.every=300", "train.ema_decay=0.995"],
                      "shapes-clip"),
    # seed 1, 64 shapes-train prompts: 0.773 (teacher) → 0.795 → 0.805 → 0.813 → 0.836 at 120-step intervals
    "dpo-720": ("dpo", "align_dpo_shapes.yaml", ["train.lr=3e-5", "train.steps=720", "eval.every=120", *SELECT], None),
    # seed 2 (which collapsed at lr 2e-4): lr 1e-4 with the EMA rose steadily, 0.36 → 0.70 (600) → 0.76 (900)
    "dipp-1500": ("dipp", "align_dipp_shapes.yaml", ["train.steps=1500", "train.lr=1e-4", "train.ema_decay=0.995",
                                                     "eval.every=100", "eval.samples_per_prompt=2", *SELECT],
                  "shapes-clip"),
    # seed 1, 64 shapes-train prompts, every 12 steps: 0.773 → 0.789 → 0.784 → 0.793 → 0.810 → 0.816 → 0.788
    "spo-72": ("spo", "align_spo_shapes.yaml", ["train.steps=72", "eval.every=12", *SELECT], LEARNED),
    # SPO with the oracle ranking its pools (preference.reward): does a better preference model make SPO work?
    # seed 1, 64 shapes-train prompts at lr 1e-4: 0.773 → 0.797 → 0.815 (the step-aware model at 1e-4 fell)
    "spo-oracle": ("spo", "align_spo_shapes.yaml", ["preference.reward=shapes-oracle", "train.lr=1e-4",
                                                    "eval.every=12", *SELECT], "shapes-oracle"),
    # dipp-1200-ema with the best of its evaluations every 100 iterations kept (training is the same stream: the
    # evaluations draw nothing from it); lr 1e-4 (dipp-1500) collapsed too, from a lower peak (0.69, 0.67)
    "dipp-1200-ema-best": ("dipp", "align_dipp_shapes.yaml", ["train.steps=1200", "train.ema_decay=0.995",
                                                              "eval.every=100", "eval.samples_per_prompt=2", *SELECT],
                           "shapes-clip"),
    "grpo": ("grpo", "align_grpo_shapes.yaml", ["train.steps=100", "eval.every=25"], "shapes-clip"),
    "refl": ("refl", "align_refl_shapes.yaml", ["train.steps=60", "eval.every=20"], "shapes-clip"),
}
ONE_STEP = {arm for arm, (method, *_) in ARMS.items() if method == "dipp"}  # one-step generators
HELD_OUT = slice(128, 200)  # shapes-val prompts no curve and no tuning run saw
SAMPLE_SEED = 10_000
SCORES = ["shapes-oracle", "shapes-clip", LEARNED]


def train_arm(out: Path, arm: str, seed: int, reward_checkpoint: str | None, extra: list[str]) -> Path:
    method, config, settings, _ = ARMS[arm]
    overrides = [*eval_overrides(reward_checkpoint), *settings, *extra]
    if arm in ONE_STEP:  # a one-step generator has no sampler settings
        overrides = [o for o in overrides if o.split("=")[0] not in ("eval.steps", "eval.guidance", "eval.eta", "eval.batch_size")]
    if method == "spo" and reward_checkpoint and not any(o.startswith("preference.reward=") for o in settings):
        overrides.append(f"preference.checkpoint={reward_checkpoint}")
    run_dir = out / arm / f"seed{seed}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return run_align(method, REPO / "configs" / config, run_dir, overrides, seed)


def finished(run_dir: Path) -> bool:
    return (run_dir / "model" / "model_index.json").is_file() or (run_dir / "generator").is_dir()


def image_source(arm: str, run_dir: Path | None):
    """The arm's final model as an image source (prompts, seeds) -> images, sampled as its trainer samples."""
    from prefalign.diffusion.models import DiffusionModel
    from prefalign.diffusion.one_step import load_generator, one_step_source
    from prefalign.shapes.generators import ideal_renders, model_source, teacher_source

    if arm == "ideal":
        return ideal_renders
    if arm == "base":
        return teacher_source(None, "cpu", 20, 3.0)
    if arm in ONE_STEP:
        model, meta = load_generator(run_dir)
        return one_step_source(model, meta["t_init"])
    return model_source(DiffusionModel.from_pretrained(run_dir / "model").eval(), 20, 3.0)


def held_out_scores(run_dir: Path, source, rewards: dict, samples: int) -> dict[str, list[float]]:
    """Per held-out prompt, each reward's mean over `samples` images; images (uint8) and scores are cached in
    `run_dir`, so a reward added later is scored without sampling again."""
    from prefalign.shapes.prompts import prompt_set

    scores_path, images_path = run_dir / "heldout.json", run_dir / "heldout_images.pt"
    scores = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
    missing = {name: reward for name, reward in rewards.items() if name not in scores}
    if not missing:
        return scores
    prompts = list(prompt_set("val")[HELD_OUT])
    batch = [p for p in prompts for _ in range(samples)]
    if images_path.is_file():
        images = torch.load(images_path, weights_only=True).float() / 255
    else:
        with torch.no_grad():
            images = source(batch, [SAMPLE_SEED + i for i in range(len(batch))]).clamp(0, 1)
        images = (images * 255).round()
        atomic_save(images_path, lambda p: torch.save(images.to(torch.uint8), p))
        images = images / 255
    with torch.no_grad():
        scores |= {name: reward.score(images, batch).float().view(len(prompts), samples).mean(1).tolist()
                   for name, reward in missing.items()}
    atomic_write_text(scores_path, json.dumps(scores))
    return scores


def collect(out: Path, arms: list[str], seeds: list[int], rewards: dict | None, samples: int) -> dict:
    """arm -> {per_prompt: {reward: [n_prompts] mean over seeds}, per_seed: {reward: [seed means]}, compute}."""
    results = {}
    for arm in ["base", "ideal", *arms]:
        runs = [out / arm] if arm in ("base", "ideal") else [out / arm / f"seed{s}" for s in seeds]
        runs = [r for r in runs if arm in ("base", "ideal") or finished(r)]
        if not runs or (rewards is None and not all((r / "heldout.json").is_file() for r in runs)):
            continue
        per_run = [held_out_scores(r, lambda p, s, arm=arm, r=r: image_source(arm, r)(p, s), rewards or {}, samples)
                   for r in runs]
        names = [n for n in SCORES if all(n in s for s in per_run)]
        curves = [pd.read_csv(r / "eval.csv") for r in runs if (r / "eval.csv").is_file()]
        results[arm] = {
            "per_prompt": {n: np.mean([s[n] for s in per_run], axis=0) for n in names},
            "per_seed": {n: [float(np.mean(s[n])) for s in per_run] for n in names},
            "compute": float(np.mean([pd.read_csv(r / "metrics.csv")["compute"].iloc[-1] for r in runs]))
            if arm not in ("base", "ideal") else 0.0,
            "curves": curves,
        }
    return results


def ci(values) -> str:
    return str(bootstrap_ci(values))


def report(results: dict, seeds: list[int]) -> str:
    """The held-out table, paired differences against the teacher, gains per compute, hacking gaps, SPO vs DPO."""
    base, ideal = results["base"]["per_prompt"], results.get("ideal", {}).get("per_prompt")
    names = [n for n in SCORES if n in base]
    n_prompts = len(base["shapes-oracle"])
    lines = [f"Held-out: shapes-val prompts {HELD_OUT.start}–{HELD_OUT.stop - 1} ({n_prompts}), scores averaged over "
             f"samples and training seeds {seeds}; 95 % bootstrap CIs over prompts.", "",
             "| arm | seeds | compute (fwd-equiv.) | " + " | ".join(names) + " | Δ oracle vs teacher (paired) | "
             "oracle per seed |", "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for arm, r in results.items():
        if arm == "ideal":
            continue
        delta = ci(r["per_prompt"]["shapes-oracle"] - base["shapes-oracle"]) if arm != "base" else "—"
        per_seed = ", ".join(f"{v:.3f}" for v in r["per_seed"]["shapes-oracle"])
        cells = " | ".join(ci(r["per_prompt"][n]) if n in r["per_prompt"] else "—" for n in names)
        lines.append(f"| {arm} | {len(r['per_seed']['shapes-oracle'])} | {r['compute']:,.0f} | {cells} | {delta} | "
                     f"{per_seed} |")
    if ideal is not None:
        lines += ["", "Oracle gain per 10⁵ forward-equivalents, and the reward-hacking gap (gain of the optimised "
                  "reward − oracle gain, each as a fraction of the teacher → ideal-render span; paired CIs):", "",
                  "| arm | optimised reward | oracle gain / 10⁵ fwd | hacking gap |", "|---|---|---|---|"]
        for arm, r in results.items():
            if arm not in ARMS:
                continue
            optimised = ARMS[arm][3]
            gain = (r["per_prompt"]["shapes-oracle"] - base["shapes-oracle"]).mean()
            per_compute = f"{gain / r['compute'] * 1e5:+.4f}" if r["compute"] else "—"
            gap = "—"
            if optimised in r["per_prompt"]:
                def fraction(name: str, r=r) -> np.ndarray:
                    return (r["per_prompt"][name] - base[name]) / (ideal[name].mean() - base[name].mean())

                gap = ci(fraction(optimised) - fraction("shapes-oracle"))
            source = optimised or ("oracle-labelled pairs" if ARMS[arm][0] == "dpo" else "none (α_rew = 0)")
            lines.append(f"| {arm} | {source} | {per_compute} | {gap} |")
    if {"dipp", "diff-instruct"} <= results.keys():
        delta = results["dipp"]["per_prompt"]["shapes-oracle"] - results["diff-instruct"]["per_prompt"]["shapes-oracle"]
        lines += ["", f"Oracle, DI++ − Diff-Instruct (paired by prompt): {ci(delta)}."]
    lines += ["", *compute_comparison(results)]
    return "\n".join(lines)


def mean_curve(curves: list[pd.DataFrame]) -> pd.DataFrame:
    """Seed-mean oracle against compute at each evaluation (runs share their evaluation steps)."""
    stacked = pd.concat([c[["step", "compute", "shapes-oracle"]] for c in curves])
    return stacked.groupby("step", as_index=False).mean()


def compute_comparison(results: dict) -> list[str]:
    """Curves on the tuning prompts (seed means) and the compute SPO needs to reach DPO's final oracle gain."""
    curves = {arm: mean_curve(r["curves"]) for arm, r in results.items() if r["curves"]}
    lines = ["Seed-mean oracle on each arm's evaluation prompts against compute (the 128 curve prompts; 64 shapes-train "
             "prompts for the arms that keep their best evaluation):", ""]
    lines += [f"- {arm}: " + "; ".join(f"{c:,.0f}: {o:.3f}" for c, o in zip(curve["compute"], curve["shapes-oracle"],
                                                                              strict=True))
              for arm, curve in curves.items()]
    for dpo_arm, spo_arm in itertools.product(curves, curves):
        if ARMS.get(dpo_arm, ("",))[0] != "dpo" or ARMS.get(spo_arm, ("",))[0] != "spo":
            continue
        if (SELECT[0] in ARMS[dpo_arm][2]) != (SELECT[0] in ARMS[spo_arm][2]):
            continue  # curves on different prompts
        dpo, spo = curves[dpo_arm], curves[spo_arm]
        start, target = dpo["shapes-oracle"].iloc[0], dpo["shapes-oracle"].iloc[-1]
        hit = spo[(spo["shapes-oracle"] >= target) & (spo["step"] > 0)]
        if target <= start:
            lines.append(f"\n{dpo_arm}'s final oracle gain is not positive ({target - start:+.3f}): no SPO target.")
        elif len(hit):
            ratio = hit["compute"].iloc[0] / dpo["compute"].iloc[-1]
            lines.append(f"\n{spo_arm} reaches {dpo_arm}'s final oracle gain ({target - start:+.3f}) at {ratio:.2f}× its "
                         "compute (target ≤ 0.20×).")
        else:
            lines.append(f"\n{spo_arm} does not reach {dpo_arm}'s final oracle gain ({target - start:+.3f}) within "
                         f"{spo['compute'].iloc[-1]:,.0f} forward-equivalents ({dpo_arm}: {dpo['compute'].iloc[-1]:,.0f}).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=4, help="held-out images per prompt and model")
    parser.add_argument("--reward-checkpoint", help="the step-aware preference model (SPO's reward, and scored)")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("ARM", "KEY=VALUE"),
                        help="an extra override for one arm's runs")
    parser.add_argument("--report", action="store_true", help="only the tables of finished, scored runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rewards = None
    if not args.report:
        for arm in args.arms:
            for seed in args.seeds:
                train_arm(args.out, arm, seed, args.reward_checkpoint, [kv for a, kv in args.set if a == arm])
        from prefalign.rewards.registry import load

        checkpoints = {LEARNED: args.reward_checkpoint} if args.reward_checkpoint else None
        rewards = {n: load(n, checkpoints, "cpu") for n in SCORES if n != LEARNED or args.reward_checkpoint}
    results = collect(args.out, args.arms, args.seeds, rewards, args.samples)
    text = report(results, args.seeds)
    atomic_write_text(args.out / "report.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
