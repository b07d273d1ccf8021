"""SPO: step-by-step preference optimisation with a step-aware preference model (Liang et al. 2024, arXiv
2406.04314; official code RockeyCoss/SPO `train_scripts/train_spo.py`).

A round samples prompts and runs the step-wise resampler (`spo_sampling.sample_step_pairs`) with the current
policy; the optimizer steps of `prefalign.train.loop` then take one pass over the round's kept pairs
(`train.batch_size` × `train.grad_accum` per step, fewer at the round's end) with the D3PO-style step loss
against a frozen reference, and the step after the last pair samples the next round. Log-probabilities are the
Gaussian transition densities of the CFG-combined prediction under the schedule's own stochastic sampler
(`generate.transition`): DDIM(η) for VP models, as in the official code, and Flow-GRPO's SDE with noise level η
for rectified flow (SD3, FLUX, the flow shapes teacher). The per-transition log-ratio is *averaged* over the
C·H·W dimensions (official `ddim_with_logprob`), so β = 10 there equals β = 10/(C·H·W) with `train.logprob=sum`.

Exact resume: a round's prompts and noise are functions of (seed, round index, process), and the round's
remaining pairs are checkpointed with the run (re-sampling them would use the updated policy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from prefalign.diffusion.generate import transition
from prefalign.diffusion.models import Conditioning
from prefalign.errors import PrefalignError
from prefalign.train.common import (
    load_prompts,
    policy_train_defaults,
    run_defaults,
    run_demo_policy_stage,
    sampled_eval_defaults,
)
from prefalign.train.loop import Method, MicroBatch, Run, train_policy
from prefalign.train.policy import DEFAULT_LORA_TARGETS, Policy
from prefalign.train.spo_sampling import PoolStats, StepPairs, sample_step_pairs

MAX_EMPTY_ROUNDS = 10  # consecutive rounds without a kept pair before a step gives up

DEFAULTS: dict = {
    **run_defaults(),
    "model": None,  # base pipeline: None / "shapes-teacher[:DIR]" / a diffusers pipeline directory
    # The step-aware preference model (`prefalign train-reward`), or a registry reward of x̂0 as `scale` · reward
    # (t ignored: the SPO paper's ablation of an off-the-shelf reward; shapes-oracle gives the ceiling).
    "preference": {"checkpoint": None, "reward": None, "scale": 20.0},
    "policy": {"lora_rank": 4, "lora_alpha": None, "lora_targets": list(DEFAULT_LORA_TARGETS),
               "reference": "copy"},
    "data": {"prompts": "shapes-train", "num_prompts": None},  # shapes-train | shapes-val | a prompt file
    # Official SD1.5 settings: DDIM 20 steps, η = 1, CFG 5, pools of k = 4, threshold 0.3, x_t at t ≤ 751 (16 of 20).
    # Rectified flow: η is the flow SDE's noise level (Flow-GRPO uses 0.7) and t = σ·T (`sample_step_pairs`).
    "sample": {"steps": 20, "eta": 1.0, "guidance": 5.0, "pool_size": 4, "threshold": 0.3,
               "timestep_range": [0, 751], "batch_size": 10, "negative_prompt": ""},
    # Optimizer steps; official SD1.5: 1,000 rounds (4,000 prompts × 10 epochs / 40 per round) of ≤ 16 steps of 10
    # pairs per process (16 branching steps per prompt), ≈ 10 at a 60 % keep rate.
    "train": policy_train_defaults(
        steps=10000,
        batch_size=10,  # pairs per micro-batch (official train_batch_size)
        lr=6e-5,
        weight_decay=1e-4,
        checkpoint_every=500,
        grad_accum=1,
        adam_betas=[0.9, 0.999],
        adam_eps=1e-8,
        beta=10.0,
        clamp_eps=0.1,  # D3PO ratio clamp to [1 − eps, 1 + eps]; null = plain step-wise DPO
        logprob="mean",  # mean (official) or sum over C·H·W of the transition log-density
    ),
    "eval": sampled_eval_defaults(every=500, num_prompts=64, guidance=5.0, rewards=["shapes-oracle"]),
    "save_dtype": None,  # e.g. float16 for the saved pipeline; training keeps fp32 master weights
}


def transition_log_ratio(
    x_prev: torch.Tensor, mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """log p_θ(x_{t−1}|x_t) − log p_ref(x_{t−1}|x_t) of two Gaussian transitions with the same std, [B].

    Equals the difference of `transition(..., prev_sample=x_prev).log_prob` (summed) for the two means, but is
    formed element-wise first so the large normalising terms cancel exactly; `mean` divides by C·H·W as the
    official SPO/D3PO `ddim_with_logprob` does.
    """
    elementwise = ((x_prev - ref_mean) ** 2 - (x_prev - mean) ** 2) / (2 * std.expand_as(x_prev) ** 2)
    if reduction == "mean":
        return elementwise.flatten(1).mean(dim=1)
    if reduction == "sum":
        return elementwise.flatten(1).sum(dim=1)
    raise PrefalignError(f"train.logprob '{reduction}' unknown; use mean or sum")


def spo_loss(
    log_ratio_win: torch.Tensor, log_ratio_lose: torch.Tensor, beta: float, clamp_eps: float | None = None
) -> torch.Tensor:
    """Step-wise DPO loss −log σ(β·log r_w − β·log r_l), r = p_θ/p_ref (SPO/D3PO `train_spo.py`).

    `clamp_eps` clamps each ratio to [1 − eps, 1 + eps] before the log, as the official code does (the gradient
    vanishes once a ratio leaves that band); None gives the plain step-wise DPO objective. Per-pair values.
    """
    if clamp_eps is not None:
        low, high = math.log1p(-clamp_eps), math.log1p(clamp_eps)
        log_ratio_win, log_ratio_lose = log_ratio_win.clamp(low, high), log_ratio_lose.clamp(low, high)
    return -F.logsigmoid(beta * (log_ratio_win - log_ratio_lose))


def pair_log_ratios(
    policy: Policy, pairs: StepPairs, cond: Conditioning, uncond: Conditioning, guidance: float, eta: float,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log r_w, log r_l) of a batch of pairs: one policy and one reference evaluation of the shared x_t serve
    both the winner and the loser (the official code evaluates x_t twice). CFG-combined outputs (`train.cfg`);
    the std of a step does not depend on the output, so both transitions share the policy's."""
    model = policy.model
    out = model.guided(pairs.x_t, pairs.t, cond, uncond, guidance)
    ref = policy.reference_guided(pairs.x_t, pairs.t, cond, uncond, guidance)
    step, ref_step = (transition(model.schedule, o, pairs.t, pairs.prev_t, pairs.x_t, eta, prev_sample=pairs.x_win,
                                 **model.sampler_kwargs()) for o in (out, ref))
    return (transition_log_ratio(pairs.x_win, step.mean, ref_step.mean, step.std, reduction),
            transition_log_ratio(pairs.x_lose, step.mean, ref_step.mean, step.std, reduction))


def round_prompt_indices(n_prompts: int, round_index: int, batch: int, seed: int) -> list[int]:
    """Prompts of sampling round r: positions r·batch … (r+1)·batch − 1 of consecutive epochs, each epoch a
    seeded permutation of all prompts (the official data loader's shuffled epochs), so a resumed run draws the
    same prompts."""
    out = []
    for pos in range(round_index * batch, (round_index + 1) * batch):
        epoch, i = divmod(pos, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[i]))
    return out


class Rounds:
    """The run's sampling rounds: the index of the next one, and the current one's prompts and the kept pairs
    not yet trained on (checkpointed, so a resumed run trains on the same pairs)."""

    def __init__(self, run: Run, scorer) -> None:
        self.run, self.scorer, self.sample = run, scorer, run.config["sample"]
        self.all_prompts = load_prompts(run.config["data"]["prompts"], run.config["data"]["num_prompts"])
        self.uncond_one = run.policy.model.encode_prompts([self.sample["negative_prompt"]])
        self.index, self.prompts, self.pairs, self.cond = 0, [], None, None

    def take(self, n: int) -> tuple[StepPairs, PoolStats | None]:
        """The next n pairs of the current round (fewer at its end), sampling new rounds while it has none; the
        sampling statistics of the rounds sampled now (None when none was)."""
        sampled = []
        while self.pairs is None or len(self.pairs) == 0:
            if len(sampled) == MAX_EMPTY_ROUNDS:
                raise PrefalignError(f"sample.threshold {self.sample['threshold']}: no pair kept in "
                                     f"{MAX_EMPTY_ROUNDS} sampling rounds in a row; lower sample.threshold")
            sampled.append(self._sample_next())
        part, self.pairs = self.pairs.index(slice(0, n)), self.pairs.index(slice(n, None))
        return part, sum(sampled, PoolStats()) if sampled else None

    def _sample_next(self) -> PoolStats:
        """Sample round `self.index`: each process takes its slice of the round's prompts and draws its own noise
        from (seed, round, process); every process keeps the same number of pairs (DDP needs matching backwards)."""
        accelerator, model, r = self.run.accelerator, self.run.policy.model, self.index
        seed = int(self.run.config["seed"])
        world, rank, batch = accelerator.num_processes, accelerator.process_index, int(self.sample["batch_size"])
        idx = round_prompt_indices(len(self.all_prompts), r, batch * world, seed)[rank * batch:][:batch]
        self.prompts = [self.all_prompts[i] for i in idx]
        generator = torch.Generator(device=model.device).manual_seed((seed * 1_000_003 + r) * 1024 + rank)
        model.train(False)
        pairs, stats = sample_round(model, self.scorer, self.prompts, self.uncond_one, self.sample, generator)
        model.train(True)
        n = int(accelerator.gather(torch.tensor([len(pairs)], device=model.device)).min())
        self.pairs = pairs.index(torch.randperm(len(pairs), generator=generator, device=model.device)[:n])
        self.cond, self.index = model.encode_prompts(self.prompts), r + 1
        stats.kept = n  # what trains, after the cross-process minimum
        return stats

    def state_dict(self) -> dict:
        pairs = {} if self.pairs is None else {f: getattr(self.pairs, f).cpu() for f in StepPairs.__dataclass_fields__}
        return {"round": self.index, "prompts": list(self.prompts), "pairs": pairs}

    def load_state_dict(self, state: dict) -> None:
        model = self.run.policy.model
        self.index, self.prompts = int(state["round"]), list(state["prompts"])
        self.pairs = StepPairs(**{k: v.to(model.device) for k, v in state["pairs"].items()}) if state["pairs"] else None
        with self.run.accelerator.autocast():  # as `take` encodes them, inside the loop's autocast
            self.cond = model.encode_prompts(self.prompts) if self.prompts else None


def spo_method(run: Run) -> Method:
    """SPO for the loop: each step trains on the next `train.grad_accum` micro-batches of `train.batch_size` kept
    pairs of the current round, sampling the next round (with the current policy) when one runs out.

    Compute per image row (a CFG evaluation of one x_t is 2): `fwd_rows` the sampling pools and chains and the
    reference on the training pairs, `fb_rows` the policy's forward+backward on them."""
    config, policy = run.config, run.policy
    sample, tr = config["sample"], config["train"]
    rounds = Rounds(run, preference_model(config["preference"], run.device))
    size, cfg_rows = int(tr["grad_accum"]) * int(tr["batch_size"]), 1 if sample["guidance"] == 1 else 2

    def micro_batches(step: int, generator: torch.Generator):
        pairs, sampled = rounds.take(size)  # rounds draw from (seed, round index), not the step's generator
        world = run.accelerator.num_processes
        for b in range(0, len(pairs), int(tr["batch_size"])):
            mb = pairs.index(slice(b, b + int(tr["batch_size"])))
            cond, uncond = rounds.cond.index(mb.prompt), rounds.uncond_one.repeat_interleave(len(mb))
            lr_w, lr_l = pair_log_ratios(policy, mb, cond, uncond, sample["guidance"], sample["eta"], tr["logprob"])
            losses = spo_loss(lr_w.float(), lr_l.float(), tr["beta"], tr["clamp_eps"])
            lr_w, lr_l = lr_w.detach(), lr_l.detach()
            stats = {"loss": float(losses.detach().mean()), "implicit_acc": float((lr_w > lr_l).float().mean()),
                     "log_ratio_win": float(lr_w.mean()), "log_ratio_lose": float(lr_l.mean())}
            sample_rows = 0
            if sampled is not None and b == 0:  # the step that sampled rounds reports them once
                stats |= {"pairs": float(sampled.kept * world), "keep_rate": sampled.kept / max(sampled.considered, 1),
                          "gap": sampled.gap_sum / max(sampled.considered, 1), "scored": float(sampled.scored * world)}
                sample_rows = sampled.denoiser_rows * cfg_rows
            yield MicroBatch(losses.sum() / len(pairs), stats, fb_rows=len(mb) * cfg_rows,
                             fwd_rows=len(mb) * cfg_rows + sample_rows)

    return Method("spo", "SPO", micro_batches, ["loss", "implicit_acc", "pairs", "gap"],
                  state_dict=rounds.state_dict, load_state_dict=rounds.load_state_dict)


class RewardPreference:
    """A registry reward as the pool ranker: logits `scale` · reward(x̂0), whatever t. With scale 20 = 1/T of the
    oracle-labelled pairs (T = 0.05), shapes-oracle's logits have the step-aware model's scale."""

    def __init__(self, reward, scale: float) -> None:
        self.reward, self.scale = reward, scale

    @torch.no_grad()
    def score_x0(self, images: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.scale * self.reward.score(images, prompts).float().to(images.device)


def preference_model(preference: dict, device: torch.device):
    """The step-aware model of `preference.checkpoint`, or `RewardPreference` of `preference.reward`."""
    from prefalign.rewards.registry import load

    if preference.get("reward"):
        return RewardPreference(load(preference["reward"], device=device), float(preference["scale"]))
    return load("step-aware", checkpoint=preference["checkpoint"], device=device)


def train(config: dict, run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """SPO from `config` (see DEFAULTS) in `run_dir`; returns `run_dir/"model"` (the merged pipeline directory).

    Writes metrics.csv/png (loss, implicit accuracy, per-round kept pairs, compute), eval.csv/png (rewards on
    held-out prompts vs compute) and checkpoint.pt (every `train.checkpoint_every` steps; `resume: true`
    continues it exactly), all by `prefalign.train.loop.train_policy`.
    """
    preference = config["preference"]
    if bool(preference.get("checkpoint")) == bool(preference.get("reward")):
        raise PrefalignError("set one of preference.checkpoint (a step-aware preference model directory from "
                             "`prefalign train-reward`, e.g. runs/reward/scorer) and preference.reward (a registry "
                             "reward of x̂0, e.g. shapes-oracle)")
    return train_policy(config, run_dir, spo_method, log)


def sample_round(model, scorer, prompts: list[str], uncond_one: Conditioning, sample: dict,
                 generator: torch.Generator) -> tuple[StepPairs, PoolStats]:
    """Run the step-wise resampler on `prompts` with the current policy and the step-aware preference model."""
    cond = model.encode_prompts(prompts)
    uncond = uncond_one.repeat_interleave(len(prompts))
    guidance = float(sample["guidance"])

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device) % len(prompts)  # pools are [k, B] flattened
        return model.guided(x, t, cond.index(rows), uncond.index(rows), guidance)

    def score(images: torch.Tensor, t: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        return scorer.score_x0(images, t, [prompts[i] for i in prompt_index.tolist()]).float()

    x_T = torch.randn((len(prompts), *model.sample_shape), generator=generator, device=model.device,
                      dtype=model.dtype)
    return sample_step_pairs(
        denoise, model.decode, score, x_T, model.schedule, int(sample["steps"]), int(sample["pool_size"]),
        float(sample["threshold"]), eta=float(sample["eta"]), timestep_range=tuple(sample["timestep_range"]),
        generator=generator, **model.sampler_kwargs(),
    )


DEMO_OVERRIDES: dict = {
    "policy": {"lora_rank": None},  # the teacher's attention is only at 8×8: LoRA there barely moves it
    "sample": {"steps": 10, "guidance": 3.0, "batch_size": 8},
    "train": {"steps": 4, "batch_size": 16, "lr": 1e-4, "log_every": 1, "checkpoint_every": 4},
    "eval": {"every": 0},
    "resume": True,  # re-running the demo reuses the finished stage
}


def demo_stage(ctx) -> None:
    """`prefalign demo` stage "spo": a short SPO run of the teacher with the step-aware preference model of the
    "reward" stage (`ctx.artifacts["step-aware"]`) in `spo/`; registers generator "SPO" (sampled like the
    teacher) for the leaderboard."""
    from prefalign.config import deep_merge

    if "step-aware" not in ctx.artifacts:
        raise PrefalignError("demo stage spo needs the step-aware preference model of the reward stage; "
                             "list 'reward' before 'spo' in stages")
    config = deep_merge(DEFAULTS, {**DEMO_OVERRIDES, "preference": {"checkpoint": str(ctx.artifacts["step-aware"])}})
    run_demo_policy_stage(ctx, "spo", "SPO", config, train)
