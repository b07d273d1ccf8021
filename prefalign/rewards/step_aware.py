"""The rewards that load trained scorers: `trained` (any scorer directory, clean images) and `step-aware`
(SPO's step-aware preference model, which also scores one-step x̂0 predictions at their timestep).

Scorer directories are written by `prefalign train-reward` (`prefalign.rewards.trainable.save_scorer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from prefalign.errors import PrefalignError
from prefalign.rewards.base import RewardInfo
from prefalign.rewards.clip_common import ClipLikeReward, as_float
from prefalign.rewards.trainable import WRITTEN_BY, PreferenceScorer, load_scorer


def predict_x0_images(
    model: Any, x_t: torch.Tensor, t: torch.Tensor | int, prompts: Sequence[str], guidance: float
) -> torch.Tensor:
    """SPO's SPM input (`spm_task.py::get_noised_imgs`): the base model's one-step x̂0 from x_t with CFG
    (`DiffusionModel.predict_x0`, "" unconditional), decoded to images in [0, 1]."""
    x_t = x_t.to(model.device, model.dtype)
    t = torch.as_tensor(t, device=x_t.device)
    t = t.long() if model.schedule.kind == "vp" else t
    t = t.expand(len(x_t)) if t.ndim == 0 else t
    cond, uncond = model.encode_prompts(list(prompts)), model.encode_prompts([""])
    return model.decode(model.predict_x0(x_t, t, cond, uncond, guidance)[0])


class ScorerReward(ClipLikeReward):
    """A saved scorer as a RewardModel: `score` (official preprocessing of the backbone) and `differentiable`
    score clean images (t = 0 for a time-conditioned scorer)."""

    def __init__(self, scorer: PreferenceScorer, info: RewardInfo) -> None:
        super().__init__(info)
        self.scorer = scorer
        self.uses_prompts = scorer.uses_prompts
        self.context_length = scorer.backbone.context_length

    def preprocess_pil(self, img: Image.Image) -> torch.Tensor:
        return self.scorer.backbone.preprocess_pil(img)

    def preprocess_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer.backbone.preprocess_tensor(x)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        return self.scorer.backbone.token_counts(prompts)

    def reward_from_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.scorer.logits_from_pixels(pixels, prompts)


class StepAwareReward(ScorerReward):
    """SPO's step-aware preference model: also scores one-step x̂0 predictions at their timestep t."""

    def __init__(
        self,
        scorer: PreferenceScorer,
        info: RewardInfo,
        base_model: Any = None,
        guidance: float | None = None,
    ) -> None:
        super().__init__(scorer, info)
        # Not a submodule: a trainer may pass its own model, which this reward must not freeze or move.
        object.__setattr__(self, "_base", base_model)
        self.guidance = guidance

    @torch.no_grad()
    def score_x0(self, images: torch.Tensor, t: torch.Tensor | int, prompts: Sequence[str]) -> torch.Tensor:
        """Logits of x̂0 images [B, 3, H, W] in [0, 1] predicted at timesteps t (SPO's candidate scoring)."""
        return self.scorer(images, prompts, t).float()

    @torch.no_grad()
    def score_noisy(self, x_t: torch.Tensor, t: torch.Tensor | int, prompts: Sequence[str]) -> torch.Tensor:
        """`score_x0` of the base model's decoded one-step x̂0 from x_t (base model, CFG scale: meta)."""
        prompts = self._check_batch(len(x_t), prompts)
        if self._base is None or isinstance(self._base, str):
            from prefalign.diffusion.models import load_model

            spec = self._base if isinstance(self._base, str) else self.scorer.meta.get("base_model")
            object.__setattr__(self, "_base", load_model(spec, self.device))
        if self.guidance is None:
            raise PrefalignError(
                "this scorer records no guidance scale (meta 'guidance'); pass the option guidance=SCALE"
            )
        images = predict_x0_images(self._base, x_t, t, prompts, self.guidance)
        return self.score_x0(images.to(self.device), t, prompts)


def _scorer_info(name: str, scorer: PreferenceScorer, folder: Path) -> RewardInfo:
    spec = scorer.spec
    step = " time-conditioned" if spec["time_conditioned"] else ""
    return RewardInfo(
        name=name,
        version=f"{spec['backbone']} {spec['kind']}{step} scorer ({folder.name})",
        higher_is_better=True,
        input_size=scorer.backbone.input_size,
        convention="exp(logit_scale) x cosine (PickScore)" if spec["kind"] == "clip" else "raw head output",
    )


def _require_checkpoint(name: str, checkpoint: str | Path | None) -> Path:
    if checkpoint is None:
        raise PrefalignError(
            f"the {name} reward needs a scorer directory written by {WRITTEN_BY}; "
            f"pass --checkpoint {name}=DIR"
        )
    return Path(checkpoint)


def load_step_aware(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    base_model: Any = None,
    guidance: float | str | None = None,
) -> StepAwareReward:
    """Registry entry `step-aware`: a scorer directory; `base_model` (spec or DiffusionModel) and `guidance`
    override what its meta records for `score_noisy`."""
    folder = _require_checkpoint("step-aware", checkpoint)
    scorer = load_scorer(folder, device).to(dtype=dtype)
    scale = guidance if guidance is not None else scorer.meta.get("guidance")
    scale = None if scale is None else as_float(scale)
    return StepAwareReward(scorer, _scorer_info("step-aware", scorer, folder), base_model, scale).eval()


def load_trained(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ScorerReward:
    """Registry entry `trained`: any scorer directory written by `prefalign train-reward`, scored at t = 0."""
    folder = _require_checkpoint("trained", checkpoint)
    scorer = load_scorer(folder, device).to(dtype=dtype)
    return ScorerReward(scorer, _scorer_info("trained", scorer, folder)).eval()
