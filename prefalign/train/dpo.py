"""Diffusion-DPO (Wallace et al. 2024, arXiv 2311.12908): fine-tune a diffusion model on preference pairs.

Per pair (winner x₀ʷ, loser x₀ˡ, prompt c) one timestep t and one noise ε are shared by both images (official
`train.py`: `noise.chunk(2)[0].repeat(2)`), x_t = α_t x₀ + σ_t ε, and ℓ = w(t)·mean‖f(x_t, t, c) − target‖² is the
per-element-mean error of the policy θ and of the frozen reference. With

    z = ½·[(ℓ_ref(w) − ℓ_ref(l)) − (ℓ_θ(w) − ℓ_θ(l))]

the losses are sigmoid −log σ(β·z) (paper Eq. 14; the official code's `−logsigmoid(−0.5·β·(model_diff −
ref_diff))`), hinge relu(1 − β·z) and IPO (z − 1/(2β))² (Azar et al. 2023), the variants of diffusers'
port. β is in the official code's normalisation: per-element mean and the 0.5 factor, so β = 5000 here is the
launchers' `--beta_dpo 5000`, diffusers' `--beta_dpo 2500` (no 0.5) and β_paper = β/(2·C·H·W) in the paper's
pseudocode (sum over elements, no 0.5). With policy = reference, z = 0 and the sigmoid loss is log 2.

Target: the model's own parameterisation by default (`loss.space=native`), as diffusers' port does; for a
v-model ‖v − v̂‖² = ‖ε − ε̂‖²/α_t², i.e. the ε-form of Eq. 14 with ω(λ_t) = 1 + 1/SNR(t). `loss.space=epsilon`
converts policy and reference outputs to ε̂ first (the official code, which asserts ε-prediction). Ties are
dropped and winners put first (official). Options: Min-SNR-γ weighting w(t) and Laplace logSNR timesteps from
the diffusion core, prompt dropout (official 0.2), and an SFT warm-up (`train.sft_steps`: denoising loss on the
winners only, the official `--sft` objective; the reference stays the base model).

Compute is counted per image row: `fb_calls` denoiser forward+backward passes of the policy, `fwd_calls`
forward-only passes (the reference); `compute` = fwd_calls + 3·fb_calls forward-equivalents (a backward costs
about two forwards; measured 3.1× on the shapes teacher). Evaluation sampling is not training compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prefalign.config import deep_merge
from prefalign.diffusion.conversions import convert
from prefalign.diffusion.losses import denoising_loss
from prefalign.diffusion.timesteps import TimestepSampler
from prefalign.errors import PrefalignError
from prefalign.train.common import (
    policy_train_defaults,
    run_defaults,
    run_demo_policy_stage,
    sampled_eval_defaults,
)
from prefalign.train.loop import Method, MicroBatch, Run, train_policy
from prefalign.train.policy import DEFAULT_LORA_TARGETS, Policy

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
DEFAULTS: dict = {
    **run_defaults(),
    "model": None,  # base pipeline: None / "shapes-teacher[:DIR]" (the shapes teacher) or a pipeline directory
    "data": {"source": "shapes:web?n=4000&seed=1", "split": "train", "limit": None},
    "policy": {"lora_rank": None, "lora_alpha": None, "lora_targets": list(DEFAULT_LORA_TARGETS),
               "reference": "copy"},
    "loss": {
        "type": "sigmoid",
        "beta": 5000.0,  # official code's normalisation (see the module docstring)
        "space": "native",  # native (ε, v or x₀ as the model predicts) | epsilon
        "weighting": "uniform",  # uniform | snr | min_snr
        "snr_gamma": 5.0,
        "timesteps": {"kind": "uniform", "loc": 0.0, "scale": None},
    },
    "train": policy_train_defaults(
        steps=500,
        batch_size=8,  # pairs per process per micro-batch
        grad_accum=1,
        prompt_dropout=0.2,  # official --proportion_empty_prompts
        sft_steps=0,
    ),
    "eval": sampled_eval_defaults(every=100),
    "save_dtype": None,  # e.g. float16 for the saved pipeline; training keeps fp32 master weights
}


def diffusion_dpo_loss(
    policy_error: torch.Tensor, reference_error: torch.Tensor, beta: float, kind: str = "sigmoid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO loss and margin z from per-sample errors ordered [winners; losers] ([2B] each).

    z = ½·((ℓ_ref,w − ℓ_ref,l) − (ℓ_θ,w − ℓ_θ,l)) is the implicit reward margin (log-ratio estimate, Eq. 14 with
    T·ω folded into β); sigmoid −log σ(βz) (official `train.py`), hinge relu(1 − βz), IPO (z − 1/(2β))².
    """
    policy_w, policy_l = policy_error.float().chunk(2)
    reference_w, reference_l = reference_error.float().chunk(2)
    z = 0.5 * ((reference_w - reference_l) - (policy_w - policy_l))
    if kind == "sigmoid":
        return -F.logsigmoid(beta * z), z
    if kind == "hinge":
        return torch.relu(1 - beta * z), z
    if kind == "ipo":
        return (z - 1 / (2 * beta)) ** 2, z
    raise PrefalignError(f"loss.type '{kind}' unknown; use one of {', '.join(LOSS_TYPES)}")


def prediction_error(
    output: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, model,
    space: str = "native", weighting: str = "uniform", snr_gamma: float = 5.0,
) -> torch.Tensor:
    """w(t)·per-element-mean squared error of a network output [B] in the model's own target space or in ε."""
    prediction_type = model.prediction_type
    if space == "epsilon" and prediction_type != "epsilon":
        alpha, sigma = model.schedule.alpha_sigma(t, like=x_t)
        output, prediction_type = convert(output, x_t, alpha, sigma, prediction_type, "epsilon"), "epsilon"
    elif space not in ("native", "epsilon"):
        raise PrefalignError(f"loss.space '{space}' unknown; use native or epsilon")
    return denoising_loss(output, x0, noise, t, model.schedule, prediction_type, weighting, snr_gamma)


class PairData:
    """Decided preference pairs (ties dropped, winner first) from `preference_data.load_preference_data`."""

    def __init__(self, source: str, split: str, resolution: int, limit: int | None, log: Callable) -> None:
        from prefalign.train.preference_data import collate_pairs, load_preference_data

        self.data = load_preference_data(source, split=split, resolution=resolution, limit=limit, log=log)
        labels = self.data.label_0.tolist()
        self.order = [(i, label == 0.0) for i, label in enumerate(labels) if label != 0.5]  # (index, swap)
        self.collate = collate_pairs
        if not self.order:
            raise PrefalignError(f"data.source '{source}': no decided pairs (every label is a tie)")
        log(f"[dpo] {len(self.order)} decided pairs ({len(labels) - len(self.order)} ties dropped) from {source}")

    def draw(self, n: int, model, config: dict, generator: torch.Generator) -> Pairs:
        """n pairs drawn uniformly with replacement, with their prompt dropout, timesteps and noise."""
        picks = [self.order[int(i)] for i in torch.randint(len(self.order), (n,), generator=generator)]
        batch = self.collate([self.data[i] for i, _ in picks])
        swap = torch.tensor([s for _, s in picks]).view(-1, 1, 1, 1)
        drop = (torch.rand(n, generator=generator) < config["train"]["prompt_dropout"]).tolist()
        t = TimestepSampler(**config["loss"]["timesteps"])(n, model.schedule, generator)
        return Pairs(
            prompts=["" if d else c for c, d in zip(batch.captions, drop, strict=True)],
            winners=torch.where(swap, batch.images_1, batch.images_0),
            losers=torch.where(swap, batch.images_0, batch.images_1),
            t=t, noise=torch.randn((n, *model.sample_shape), generator=generator),
        )


@dataclass
class Pairs:
    """A batch of pairs: prompts ("" where dropped), winner and loser images in [0, 1], and the timestep and noise
    each pair's two images share."""

    prompts: list[str]
    winners: torch.Tensor
    losers: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor

    def shard(self, index: int, count: int) -> Pairs:
        """This process's equal share of a global batch (so N processes see what one process would)."""
        size = len(self.prompts) // count
        part = slice(index * size, (index + 1) * size)
        return Pairs(self.prompts[part], self.winners[part], self.losers[part], self.t[part], self.noise[part])


def dpo_step(
    policy: Policy, pairs: Pairs, config: dict, generator: torch.Generator | None = None, sft: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: policy and reference errors on x_t of winner and loser (shared t and ε, as the official
    code), the mean loss and its statistics; `sft` is the denoising loss on the winners alone."""
    model, loss_cfg = policy.model, config["loss"]
    device = model.device
    images = pairs.winners if sft else torch.cat([pairs.winners, pairs.losers])
    x0 = model.encode_images(images.to(device), generator=generator)  # `generator`: VAE posterior sample
    t, noise = pairs.t.to(device), pairs.noise.to(device, x0.dtype)
    if not sft:
        t, noise = t.repeat(2), noise.repeat(2, 1, 1, 1)
    x_t = model.schedule.add_noise(x0, noise, t)
    cond = model.encode_prompts(pairs.prompts)
    cond = cond if sft else cond.cat(cond)
    options = {"space": loss_cfg["space"], "weighting": loss_cfg["weighting"], "snr_gamma": loss_cfg["snr_gamma"]}
    policy_error = prediction_error(model(x_t, t, cond), x_t, x0, noise, t, model, **options)
    if sft:
        mse = float(policy_error.detach().mean())
        return policy_error.mean(), {"loss": mse, "policy_mse": mse}
    reference_error = prediction_error(policy.reference(x_t, t, cond), x_t, x0, noise, t, model, **options)
    losses, z = diffusion_dpo_loss(policy_error, reference_error, loss_cfg["beta"], loss_cfg["type"])
    z = z.detach()
    accuracy = (z > 0).float() + 0.5 * (z == 0).float()  # implicit preference accuracy, ties half
    stats = {"loss": float(losses.detach().mean()), "margin": float(loss_cfg["beta"] * z.mean()),
             "implicit_acc": float(accuracy.mean()), "policy_mse": float(policy_error.detach().mean()),
             "reference_mse": float(reference_error.mean())}
    return losses.mean(), stats


def dpo_method(run: Run) -> Method:
    """Diffusion-DPO for the loop: `train.grad_accum` micro-batches of `train.batch_size` pairs per process."""
    config, accelerator, policy = run.config, run.accelerator, run.policy
    tr = config["train"]
    if config["loss"]["type"] not in LOSS_TYPES:
        raise PrefalignError(f"loss.type '{config['loss']['type']}' unknown; use one of {', '.join(LOSS_TYPES)}")
    data = PairData(config["data"]["source"], config["data"]["split"], policy.model.image_size[0],
                    config["data"]["limit"], run.log)
    world, accum, batch_size = accelerator.num_processes, int(tr["grad_accum"]), int(tr["batch_size"])

    def micro_batches(step: int, generator: torch.Generator):
        sft = step < tr["sft_steps"]
        for _ in range(accum):
            # The global batch (pairs, dropout, t, ε) comes from the step's generator, so N processes see what one
            # would; the VAE posterior sample also depends on the process.
            pairs = data.draw(batch_size * world, policy.model, config, generator)
            pairs = pairs.shard(accelerator.process_index, world)
            vae = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)) + accelerator.process_index)
            loss, stats = dpo_step(policy, pairs, config, vae, sft)
            yield MicroBatch(loss / accum, stats, fb_rows=batch_size * (1 if sft else 2),
                             fwd_rows=0 if sft else 2 * batch_size)

    return Method("dpo", "Diffusion-DPO", micro_batches, ["loss", "implicit_acc", "margin", "policy_mse"],
                  phase=lambda step: "sft" if step < tr["sft_steps"] else "dpo")


def train(config: dict, run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Diffusion-DPO from `config` (see DEFAULTS) in `run_dir`; returns `run_dir/"model"` (a pipeline directory).

    Writes metrics.csv/png (training), eval.csv/png (rewards on held-out prompts vs step and compute),
    checkpoint.pt (every `train.checkpoint_every` steps; `resume: true` continues it exactly).
    """
    return train_policy(config, run_dir, dpo_method, log)


DEMO_OVERRIDES: dict = {
    "data": {"source": "shapes:web?n=600&seed=1"},
    "loss": {"beta": 500.0},  # as configs/align_dpo_shapes.yaml
    "train": {"steps": 30, "batch_size": 8, "lr": 1e-4, "log_every": 5, "checkpoint_every": 30},
    "eval": {"every": 0},
    "resume": True,  # re-running the demo reuses the finished stage
}


def demo_stage(ctx) -> None:
    """`prefalign demo` stage "dpo": a short Diffusion-DPO run of the teacher on simulated web-data preference
    pairs in `dpo/`; registers the result as generator "DPO" (sampled like the teacher) for the leaderboard."""
    run_demo_policy_stage(ctx, "dpo", "DPO", deep_merge(DEFAULTS, DEMO_OVERRIDES), train)
