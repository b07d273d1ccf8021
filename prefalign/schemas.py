"""The config schema of every command: one documentation line, range and choices per key.

Names and types come from each command's defaults dict (kept next to its code, e.g. `prefalign.train.dpo.DEFAULTS`);
this module adds what a dict cannot say. `prefalign.config.validate_config` checks a resolved config against both,
and `--show-config` prints the documentation lines. The same idea has the same key name in every command (`seed`,
`device`, `out`, `train.steps`, `train.batch_size`, `train.lr`, ...), so the shared fields are written once here.
"""

from __future__ import annotations

from prefalign.config import Field, Schema
from prefalign.diffusion.timesteps import TIMESTEP_SAMPLERS
from prefalign.diffusion.weighting import LOSS_WEIGHTINGS as WEIGHTINGS
from prefalign.train.distributed import MODES as DISTRIBUTED
from prefalign.train.grpo_sampling import ADVANTAGES, TIMESTEP_SELECTIONS
from prefalign.train.preference_losses import PAIRWISE_KINDS

PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
SAVE_DTYPES = ("float32", "float16", "bfloat16")

RUN: dict[str, Field] = {
    "seed": Field("random seed of the run (data order, noise, initialisation)", ge=0),
    "device": Field("auto, cpu, cuda or cuda:N"),
    "out": Field("run directory: config.yaml, checkpoints, metrics and results go here", type=str),
    "resume": Field("continue the run in `out` from its checkpoint (--resume)"),
}
LOG: dict[str, Field] = {
    "log.with": Field("experiment tracker that also gets every metrics row: tensorboard or wandb (via accelerate)",
                      type=str, choices=("tensorboard", "wandb")),
    "log.project": Field("tracker project name; null: prefalign", type=str),
}


def _optimiser() -> dict[str, Field]:
    return {
        "train.steps": Field("optimizer steps in total", ge=1),
        "train.batch_size": Field("examples per process and micro-batch", ge=1),
        "train.grad_accum": Field("micro-batches accumulated per optimizer step", ge=1),
        "train.lr": Field("peak learning rate", gt=0),
        "train.lr_schedule": Field("constant or cosine decay to 10 % after the warm-up", choices=LR_SCHEDULES),
        "train.warmup_steps": Field("linear learning-rate warm-up length", ge=0),
        "train.weight_decay": Field("AdamW weight decay", ge=0),
        "train.grad_clip": Field("clip the gradient norm to this (0 or null: no clipping)", type=float, ge=0,
                                 nullable=True),
        "train.mixed_precision": Field("no, fp16 (GPU) or bf16", choices=PRECISIONS),
        "train.distributed": Field("several processes: ddp (each holds every weight) or fsdp (weights, gradients, "
                                   "optimizer state sharded)", choices=DISTRIBUTED),
        "train.ema_decay": Field("EMA of the trained weights, used to evaluate and save; null: off", type=float,
                                 gt=0, le=1),
        "train.log_every": Field("write a metrics.csv row every N steps", ge=1),
        "train.checkpoint_every": Field("write checkpoint.pt every N steps (and at the end)", ge=1),
        "save_dtype": Field("dtype of the saved weights; null: float32 as trained", type=str, choices=SAVE_DTYPES),
    }


def _policy() -> dict[str, Field]:
    return {
        "model": Field("base pipeline: null or shapes-teacher[:DIR] (the shapes teacher) or a diffusers "
                       "pipeline directory", type=str),
        "policy.lora_rank": Field("LoRA rank of the trained adapter; null: full fine-tuning", type=int, ge=1,
                                  nullable=True),
        "policy.lora_alpha": Field("LoRA alpha; null: equal to the rank", type=float, gt=0),
        "policy.lora_targets": Field("module names that get LoRA adapters"),
        "policy.reference": Field("frozen reference: copy (a frozen copy) or adapter (the base with LoRA off)",
                                  choices=("copy", "adapter")),
    }


def _sampled_eval() -> dict[str, Field]:
    return {
        "eval.every": Field("evaluate at 0, every N steps and at the end; 0: never", ge=0),
        "eval.prompts": Field("held-out prompts: shapes-val, shapes-train or a prompt file"),
        "eval.num_prompts": Field("how many of those prompts; null: all", type=int, ge=1, nullable=True),
        "eval.samples_per_prompt": Field("images per prompt (seeds eval.seed + i)", ge=1),
        "eval.seed": Field("first sampling seed of the evaluation (the same noise for every model)", ge=0),
        "eval.steps": Field("sampler steps of evaluation images", ge=1),
        "eval.guidance": Field("classifier-free guidance scale of evaluation images", ge=0),
        "eval.eta": Field("DDIM eta of evaluation sampling (0: deterministic)", ge=0),
        "eval.batch_size": Field("images per sampling call", ge=1),
        "eval.rewards": Field("rewards scored on the evaluation images (registry names)"),
        "eval.reward_checkpoints": Field("reward name -> checkpoint, e.g. {step-aware: DIR}", free=True),
        "eval.reward_options": Field("reward name -> {option: value} for the evaluation rewards", free=True),
        "eval.keep_best": Field("an eval.rewards name: the saved model is the evaluation with its highest score "
                                "(select on training prompts); null: the last step", type=str, nullable=True),
    }


def _training_prompts() -> dict[str, Field]:
    return {
        "data.prompts": Field("training prompts: shapes-train, shapes-val or a prompt file"),
        "data.num_prompts": Field("use the first N prompts; null: all", type=int, ge=1),
    }


def _reward_loading() -> dict[str, Field]:
    """How a trainer's `reward.spec` loads: the same checkpoints and options `prefalign score` takes."""
    return {
        "reward.checkpoints": Field("reward name -> checkpoint", free=True),
        "reward.options": Field("reward name -> {option: value}, e.g. {shapes-clip: {clip_at_zero: false}}",
                                free=True),
    }


def _timesteps(prefix: str) -> dict[str, Field]:
    return {
        f"{prefix}.weighting": Field("loss weighting w(t): uniform, snr or min_snr (Min-SNR-gamma)", choices=WEIGHTINGS),
        f"{prefix}.snr_gamma": Field("gamma of min_snr weighting", gt=0),
        f"{prefix}.timesteps.kind": Field("timestep sampler: uniform, logit-normal, laplace or cauchy (logSNR)",
                                          choices=TIMESTEP_SAMPLERS),
        f"{prefix}.timesteps.loc": Field("location of the timestep distribution (logSNR for laplace/cauchy)"),
        f"{prefix}.timesteps.scale": Field("scale of the timestep distribution; null: the sampler's default",
                                           type=float, gt=0),
    }


DPO: Schema = {
    **RUN, **LOG, **_optimiser(), **_policy(), **_sampled_eval(), **_timesteps("loss"),
    "data.source": Field("preference pairs: shapes:web?n=N&seed=S, a Pick-a-Pic directory/parquet or a "
                         "`shapes labels` directory"),
    "data.split": Field("split of the data source to train on"),
    "data.limit": Field("use at most this many pairs; null: all", type=int, ge=1),
    "loss.type": Field("sigmoid (Diffusion-DPO), hinge or ipo", choices=("sigmoid", "hinge", "ipo")),
    "loss.beta": Field("beta in the official code's normalisation (per-element mean, 0.5 factor)", gt=0),
    "loss.space": Field("native (the model's own prediction) or epsilon", choices=("native", "epsilon")),
    "train.prompt_dropout": Field("probability of training on the empty prompt (CFG)", ge=0, le=1),
    "train.sft_steps": Field("first N steps are supervised fine-tuning on the winners", ge=0),
}

SPO: Schema = {
    **RUN, **LOG, **_optimiser(), **_policy(), **_sampled_eval(),
    "train.steps": Field("optimizer steps in total (a round is sampled when the last one's pairs run out)", ge=1,
                         aliases=("train.rounds",)),
    "train.warmup_steps": Field("linear learning-rate warm-up length", ge=0, aliases=("train.warmup_rounds",)),
    "preference.checkpoint": Field("step-aware preference model directory (`prefalign train-reward`)", type=str),
    "preference.reward": Field("instead: a registry reward of the candidates' x̂0, t ignored (e.g. shapes-oracle)",
                               type=str),
    "preference.scale": Field("logits of preference.reward: scale x reward (20 = 1/T of oracle-labelled pairs)",
                              gt=0),
    **_training_prompts(),
    "sample.steps": Field("sampler steps of the sampled trajectories (DDIM for VP, Euler-Maruyama for flow)", ge=1),
    "sample.eta": Field("step noise: DDIM eta (1: stochastic, as SPO) or the flow SDE's noise level", ge=0),
    "sample.guidance": Field("classifier-free guidance scale while sampling", ge=0),
    "sample.pool_size": Field("candidates per step; the best and worst form a pair", ge=2),
    "sample.threshold": Field("minimum preference-score gap for a pair to train on (negative: keep every pair)"),
    "sample.timestep_range": Field("[low, high]: branch x_t with t in this range (flow: t = sigma*T)"),
    "sample.batch_size": Field("prompts per process and sampling round", ge=1),
    "sample.negative_prompt": Field("negative prompt of the unconditional branch"),
    "train.adam_betas": Field("AdamW betas [beta1, beta2]"),
    "train.adam_eps": Field("AdamW epsilon", gt=0),
    "train.beta": Field("DPO beta of the step-wise loss", gt=0),
    "train.clamp_eps": Field("clamp the ratio to [1 - eps, 1 + eps] (D3PO); null: plain step-wise DPO",
                             type=float, gt=0, nullable=True),
    "train.logprob": Field("mean (official) or sum of the transition log-density", choices=("mean", "sum")),
}

REFL: Schema = {
    **RUN, **LOG, **_optimiser(), **_policy(), **_sampled_eval(),
    "policy.reference": Field("frozen reference: none (the loss needs none), copy or adapter",
                              choices=("none", "copy", "adapter")),
    **_training_prompts(),
    "reward.spec": Field("differentiable reward (registry name or weighted sum, e.g. 0.5*hpsv2.1+aesthetic)"),
    "reward.alpha": Field("reward weight alpha of the loss (ReFL's grad_scale)", gt=0),
    "reward.margin": Field("null: loss -alpha*r; a number m: alpha*relu(m - r) (ReFL.py: 2 with imagereward)",
                           type=float),
    **_reward_loading(),
    "sample.steps": Field("sampler steps of the training rollouts", ge=1),
    "sample.guidance": Field("classifier-free guidance scale of the rollouts (1: conditional only, as ReFL.py)",
                             ge=0),
    "sample.eta": Field("DDIM eta (VP; 1: ReFL.py's DDPM step) or flow SDE noise level of the rollouts", ge=0),
    "sample.negative_prompt": Field("negative prompt of the unconditional branch"),
    "backprop.mode": Field("refl (one gradient step to x0-hat at a random stop step) or draft (DRaFT-K: the "
                           "last K steps)", choices=("refl", "draft")),
    "backprop.stop_range": Field("refl: [low, high] 0-based stop steps on the sampler grid (ReFL.py: [30, 39] "
                                 "of 40)"),
    "backprop.last_k": Field("draft: K, the last sampler steps under gradient", ge=1),
}

DIPP: Schema = {
    **RUN, **LOG,
    **{k: v for k, v in _optimiser().items() if k in (
        "train.steps", "train.batch_size", "train.lr", "train.lr_schedule", "train.warmup_steps", "train.grad_clip",
        "train.mixed_precision", "train.ema_decay", "train.log_every", "train.checkpoint_every", "save_dtype")},
    **_policy(),
    "model": Field("reference diffusion model (VP or flow): null, shapes-teacher[:DIR] or a pipeline directory",
                   type=str),
    "policy.reference": Field("s_ref: copy or adapter (the base with LoRA off); null: adapter with LoRA, else copy",
                              type=str, choices=("copy", "adapter")),
    **_training_prompts(),
    "reward.spec": Field("reward (registry name or weighted sum, e.g. 0.5*hpsv2.1+aesthetic)"),
    "reward.alpha": Field("reward weight alpha_rew; 0 is Diff-Instruct (the reward is never loaded)", ge=0),
    **_reward_loading(),
    "guidance": Field("CFG scale of the reference score", ge=0),
    "generator.t_init": Field("the one-step generator's timestep (VP: t, flow: sigma*T); null: the top, "
                              "625 for epsilon", type=float, gt=0),
    "ta.updates": Field("teaching-assistant DSM steps per generator step", ge=1),
    "ta.lr": Field("teaching-assistant learning rate", gt=0),
    "ta.weighting": Field("DSM loss weighting of the teaching assistant", choices=WEIGHTINGS),
    "ta.lora_rank": Field("LoRA rank of the teaching assistant (on policy.lora_targets); null: full", type=int, ge=1),
    "ta.lora_alpha": Field("LoRA alpha of the teaching assistant; null: the rank", type=float, gt=0),
    "train.adam_betas": Field("Adam betas [beta1, beta2] of both optimizers"),
    "train.t_min": Field("smallest training-table entry of the integral KL's timesteps", ge=0),
    "train.t_max": Field("largest training-table entry of the integral KL's timesteps", ge=1),
    "train.ikl_weighting": Field("w(t): x0 (Diff-Instruct) or dmd (normalised per sample)", choices=("x0", "dmd")),
    **{k: v for k, v in _sampled_eval().items() if k in (
        "eval.every", "eval.prompts", "eval.num_prompts", "eval.samples_per_prompt", "eval.seed", "eval.rewards",
        "eval.reward_checkpoints", "eval.reward_options", "eval.keep_best")},
}

GRPO: Schema = {
    **RUN, **LOG, **_policy(), **_sampled_eval(),
    **{k: v for k, v in _optimiser().items() if k not in ("train.batch_size", "train.grad_accum")},
    "train.batch_size": Field("rows per process of one sampling forward and one training micro-batch", ge=1),
    "train.timestep_fraction": Field("share of the sampler steps trained per rollout (the last step never is)",
                                     gt=0, le=1),
    "train.timestep_selection": Field("trained steps: first (the noisiest, Flow-GRPO) or random (DanceGRPO)",
                                      choices=TIMESTEP_SELECTIONS),
    **_training_prompts(),
    "reward.spec": Field("reward (registry name or weighted sum, e.g. 0.5*shapes-clip+0.5*shapes-oracle)"),
    **_reward_loading(),
    "reward.advantage": Field("sum: normalise the weighted sum in the group; per_reward: normalise each term, "
                              "then sum", choices=ADVANTAGES),
    "sample.steps": Field("sampler steps of the rollouts", ge=2),
    "sample.eta": Field("DDIM eta (VP) or SDE noise level (flow) of the rollouts; must be > 0", gt=0),
    "sample.guidance": Field("classifier-free guidance scale of rollouts and training forwards", ge=0),
    "sample.group_size": Field("samples per prompt (the group of the advantage)", ge=2),
    "sample.prompts_per_step": Field("prompts per optimizer step over all processes", ge=1),
    "sample.negative_prompt": Field("negative prompt of the unconditional branch"),
    "sample.sde_window_size": Field("Flow-GRPO-Fast: only this many consecutive steps are stochastic and "
                                    "trained; 0: every step is stochastic", ge=0),
    "sample.sde_window_range": Field("[low, high]: the window lies within these steps (high null: the last)"),
    "loss.clip_range": Field("PPO clip epsilon of the likelihood ratio", gt=0),
    "loss.adv_clip_max": Field("clamp advantages to +- this", gt=0),
    "loss.kl_beta": Field("weight of the KL to the reference (0: none)", ge=0),
}

TRAIN_REWARD: Schema = {
    **RUN, **LOG,
    **{k: v for k, v in _optimiser().items() if k in (
        "train.steps", "train.batch_size", "train.grad_accum", "train.lr", "train.lr_schedule", "train.warmup_steps",
        "train.weight_decay", "train.grad_clip", "train.mixed_precision", "train.ema_decay", "train.log_every",
        "train.checkpoint_every")},
    "data.source": Field("preference pairs: shapes:web?n=N&seed=S, a Pick-a-Pic directory/parquet or a "
                         "`shapes labels` directory; ranked groups (loss.kind=plackett_luce): shapes:web?n=N&k=K&seed=S "
                         "or a folder with train.jsonl (prefalign/train/preference_groups.py)"),
    "data.split": Field("training split"),
    "data.val_source": Field("validation pairs; null: data.source", type=str),
    "data.val_split": Field("validation split; null: hold out data.val_fraction of the training captions",
                            type=str, nullable=True),
    "data.val_fraction": Field("fraction of captions held out when there is no validation split", gt=0, le=0.5),
    "data.resolution": Field("resize + centre-crop images to this size at load time (mixed sizes)", type=int, ge=1),
    "data.limit": Field("use at most this many training pairs; null: all", type=int, ge=1),
    "data.val_limit": Field("use at most this many validation pairs", type=int, ge=1, nullable=True),
    "model.kind": Field("clip (PickScore/HPS-like scorer) or head (MLP on frozen embeddings)",
                        choices=("clip", "head")),
    "model.backbone": Field("shapes-clip, open_clip:ARCH or hf-clip"),
    "model.checkpoint": Field("the backbone's base weights; null: the backbone's default", type=str),
    "model.init_from": Field("a trained scorer directory to start from", type=str),
    "model.time_conditioned": Field("step-aware model: timestep conditioning (adaLN) on noised x0 predictions"),
    "model.train": Field("full, lora or frozen (only head/adaLN train); null: full for clip, frozen for head",
                         type=str, choices=("full", "lora", "frozen")),
    "model.lora_rank": Field("LoRA rank when model.train=lora", ge=1),
    "model.lora_alpha": Field("LoRA alpha; null: the rank", type=float, gt=0),
    "model.options": Field("backbone options, e.g. with_text for heads, pipeline for open_clip", free=True),
    "step_aware.base_model": Field("model predicting x0 from noised pairs: shapes-teacher[:DIR], a pipeline "
                                   "directory, or null for clean images", type=str, nullable=True),
    "step_aware.guidance": Field("CFG scale of the x0 prediction", ge=0),
    "loss.kind": Field("soft (PickScore ties 0.5/0.5), bt (ties dropped) or btt (Bradley-Terry with ties) on "
                       "pairs; plackett_luce on ranked groups", choices=(*PAIRWISE_KINDS, "plackett_luce")),
    "loss.top_k": Field("plackett_luce: the first top_k places of each ranking (1: best of the group); null: all",
                        type=int, ge=1),
    "loss.temperature": Field("Bradley-Terry temperature", gt=0),
    "loss.learn_temperature": Field("learn the temperature"),
    "loss.tie_theta": Field("tie parameter theta of btt", gt=1),
    "loss.learn_tie_theta": Field("learn theta"),
    "loss.per_prompt_weighting": Field("weight each pair 1/n of its prompt's pairs (PickScore)"),
    "train.gradient_checkpointing": Field("recompute ViT activations in the backward pass to save memory"),
    "eval.every": Field("validate at step 0, every N steps and at the end; 0: never", ge=0),
    "eval.batch_size": Field("pairs per validation batch", ge=1),
    "eval.timesteps": Field("noise levels of the step-aware accuracy table"),
    "eval.noise_seed": Field("seed of the validation noise", ge=0),
    "eval.cache_max_bytes": Field("keep validation x0 images in memory below this size", ge=0),
}

BENCH: Schema = {
    **{k: RUN[k] for k in ("seed", "device", "out")},
    "suite": Field("prompt suite: coco-val, parti, drawbench, hps, pickapic-val, shapes-val or file:PATH", type=str),
    "prompts_file": Field("the suite's file (COCO captions JSON, PartiPrompts.tsv, ...)", type=str),
    "num_prompts": Field("a seeded subset of this many prompts; null: the whole suite", type=int, ge=1),
    "samples_per_prompt": Field("images per prompt (seeds)", ge=1),
    "generators": Field("generator specs (`prefalign generators` lists the kinds)"),
    "rewards": Field("reward names or weighted sums (`prefalign rewards` lists them)"),
    "baseline": Field("generator label for win rates; null: the first", type=str),
    "checkpoints": Field("reward name -> local checkpoint", free=True),
    "options": Field("reward name -> {option: value}", free=True),
    "batch_size": Field("images per generator call and reward pass (a resumed run must keep it)", ge=1),
    "dtype": Field("reward dtype", choices=SAVE_DTYPES),
    "gallery_prompts": Field("prompts shown in gallery.html", ge=0),
}

GENERATE: Schema = {
    **{k: BENCH[k] for k in ("suite", "prompts_file", "num_prompts", "samples_per_prompt", "seed", "device",
                             "out")},
    "prompts": Field("prompts given directly instead of a suite"),
    "generator": Field("generator spec (`prefalign generators` lists the kinds)", type=str),
    "batch_size": Field("images per generator call (a resumed run must keep it)", ge=1),
}

SCORE: Schema = {
    "rewards": Field("reward names or weighted sums (`prefalign rewards` lists them)"),
    "images": Field("image directory, glob pattern or CSV (path[,prompt])", type=str),
    "prompts": Field("text file with one prompt per image, in image order", type=str),
    "prompt": Field("one prompt for every image", type=str),
    "out": Field("CSV to write"),
    "batch_size": Field("images per forward pass", ge=1),
    "device": RUN["device"],
    "dtype": Field("reward dtype", choices=SAVE_DTYPES),
    "checkpoints": Field("reward name -> local checkpoint", free=True),
    "options": Field("reward name -> {option: value}", free=True),
    "workers": Field("image-decoding processes overlapping the forward passes; 0: decode in this process", ge=0),
    "fast": Field("bfloat16 autocast + channels-last: faster where it helps, not bit-exact"),
}

DEMO: Schema = {
    **{k: RUN[k] for k in ("seed", "device", "out")},
    "teacher": Field("teacher pipeline directory; null: the checkpoint shipped with prefalign", type=str),
    "num_prompts": Field("held-out shapes prompts in the leaderboard", ge=1),
    "samples_per_prompt": Field("images per prompt and generator", ge=1),
    "sampler.steps": Field("sampler steps of the multi-step generators", ge=1),
    "sampler.guidance": Field("classifier-free guidance scale", ge=0),
    "sampler.eta": Field("DDIM eta (0: deterministic)", ge=0),
    "rewards": Field("rewards of the leaderboard"),
    "stages": Field("stages to run, in order: reward, dpo, spo, dipp, grpo, leaderboard"),
    "checkpoints": Field("dpo, spo, dipp stages: shipped (load the full benchmark's checkpoints) or train (train "
                         "them at demo scale)", choices=("shipped", "train")),
}

# `shapes pretrain`. `arch` is passed to diffusers/transformers as it is.
PRETRAIN: Schema = {
    **{k: RUN[k] for k in ("seed", "device", "out")},
    **{k: v for k, v in _optimiser().items() if k in (
        "train.steps", "train.batch_size", "train.lr", "train.warmup_steps", "train.weight_decay", "train.grad_clip",
        "train.ema_decay")},
    **_timesteps("train"),
    "data.num_examples": Field("web-data examples generated for pretraining", ge=1),
    "data.seed": Field("seed of the web data", ge=0),
    "text_encoder.mode": Field("contrastive: pretrain the CLIP text encoder against shapes-clip's image tower, then "
                               "freeze it (as SD's CLIP); joint: train a random one with the UNet",
                               choices=("contrastive", "joint")),
    "text_encoder.steps": Field("contrastive pretraining steps", ge=1),
    "text_encoder.batch_size": Field("contrastive batch (pairs of twins)", ge=2),
    "text_encoder.lr": Field("contrastive pretraining learning rate", gt=0),
    "text_encoder.num_pairs": Field("twin pairs (a scene and a one-attribute variant) to train on", ge=2),
    "text_encoder.seed": Field("seed of the contrastive pretraining", ge=0),
    "text_encoder.finetune_lr_scale": Field("contrastive mode: fine-tune the pretrained encoder with the UNet at this "
                                            "fraction of train.lr (0: frozen)", ge=0),
    "train.prompt_dropout": Field("probability of training on the empty prompt (CFG)", ge=0, le=1),
    "train.ema_decay": Field("EMA decay of the teacher weights; null: off", type=float, gt=0, le=1),
    "eval.every": Field("evaluate every N steps and at the end; 0: only at the end", ge=0),
    "eval.num_val": Field("held-out web-data examples for the validation loss", ge=1),
    "eval.val_seed": Field("seed of the held-out examples", ge=0),
    "eval.num_samples": Field("samples scored by the oracle at each evaluation", ge=0),
    "eval.sample_steps": Field("sampler steps of those samples", ge=1),
    "eval.guidance": Field("CFG scale of those samples", ge=0),
    "checkpoint_every": Field("write checkpoint.pt every N steps (and at the end)", ge=1,
                              aliases=("train.checkpoint_every",)),
    "save_dtype": Field("dtype of the saved teacher; null: float32", type=str, choices=SAVE_DTYPES, nullable=True),
    "arch": Field("teacher architecture, passed to diffusers/transformers as it is", free=True),
}

LABELS: Schema = {
    **{k: RUN[k] for k in ("seed", "out")},
    "n_pairs": Field("training pairs (with group_size: ranked groups) to write", ge=1),
    "val_pairs": Field("validation pairs (groups) to write (from different prompts); 0: none", ge=0),
    "temperature": Field("Bradley-Terry temperature of the simulated labeller", gt=0),
    "tie_margin": Field("oracle gaps below this are labelled ties", ge=0),
    "source": Field("images to compare: web (web data), quality (renders with defects) or teacher (its samples; "
                    "pairs only)"),
    "group_size": Field("K >= 2: write ranked groups of K images per prompt (train-reward loss.kind=plackett_luce) "
                        "instead of pairs; null: pairs", type=int, ge=2),
}

TRAIN_CLIP: Schema = {
    **{k: RUN[k] for k in ("seed", "out")},
    "steps": Field("training steps (800 reproduces the shipped model)", ge=1),
}
