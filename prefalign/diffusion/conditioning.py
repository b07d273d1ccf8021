"""What a denoiser needs besides x_t and t: text states, an attention mask and family-specific extras."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefalign.errors import PrefalignError


@dataclass
class Conditioning:
    """Everything the denoiser needs besides x_t and t."""

    hidden_states: torch.Tensor  # [B, L, D] encoder_hidden_states
    attention_mask: torch.Tensor | None = None  # [B, L] (PixArt / T5)
    # SDXL: text_embeds, time_ids; SD3 / FLUX: pooled_projections; FLUX guidance-distilled: guidance
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def _map(self, fn) -> Conditioning:
        mask = None if self.attention_mask is None else fn(self.attention_mask)
        return Conditioning(fn(self.hidden_states), mask, {k: fn(v) for k, v in self.added.items()})

    def cat(self, other: Conditioning) -> Conditioning:
        """Batch concatenation [self; other] (CFG runs [uncond; cond] in one forward)."""
        same_mask = (self.attention_mask is None) == (other.attention_mask is None)
        if not same_mask or self.added.keys() != other.added.keys():
            raise PrefalignError("cannot concatenate Conditionings of different models (mask/added differ)")
        mask = None if self.attention_mask is None else torch.cat([self.attention_mask, other.attention_mask])
        added = {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()}
        return Conditioning(torch.cat([self.hidden_states, other.hidden_states]), mask, added)

    def index(self, idx: torch.Tensor | slice) -> Conditioning:
        """Select rows (a slice, an index tensor or a boolean mask)."""
        return self._map(lambda x: x[idx])

    def repeat_interleave(self, n: int) -> Conditioning:
        """Repeat each row n times, e.g. one prompt per group of n samples."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to `device`; `dtype` casts floating tensors only (the attention mask keeps its int type)."""
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))
