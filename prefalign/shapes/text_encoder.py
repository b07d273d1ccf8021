"""Contrastive pretraining of the teacher's text encoder against the frozen shapes-clip image tower.

Stable Diffusion conditions its UNet on a CLIP text encoder that was trained contrastively on image–text pairs
and then frozen. The shapes teacher does the same at small scale: its transformers `CLIPTextModel` (causal
attention, EOS pooling, as CLIP's) plus a linear projection learn to match shapes-clip's image embeddings with
CLIP's symmetric InfoNCE loss on the twin dataset (each scene with a one-attribute variant as a hard negative).
The image tower stays fixed, so only the text side learns; the projection is discarded afterwards and the UNet
reads the per-token states (`last_hidden_state`), as SD does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prefalign.shapes.clip import clip_loss, load_shapes_clip, lr_factor, make_twin_dataset, twin_batch

TEXT_PRETRAIN_DEFAULTS: dict = {
    "steps": 800,
    "batch_size": 128,
    "lr": 2e-3,
    "num_pairs": 6000,
    "seed": 3,
}


def pooled_text_embedding(encoder, projection: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Unit-norm projected EOS state of a `CLIPTextModel` (CLIP's text embedding)."""
    return F.normalize(projection(encoder(tokens).pooler_output), dim=-1)


def pretrain_text_encoder(encoder, tokenizer, steps: int, batch_size: int, lr: float, num_pairs: int,
                          seed: int) -> dict:
    """Train `encoder` in place against frozen shapes-clip image embeddings, then freeze it; return a summary.

    Deterministic for a seed, torch version and thread count. The summary reports the final loss and, on
    held-out twins, how often the text embedding of an image's own prompt beats its one-attribute variant.
    """
    torch.manual_seed(seed)
    clip = load_shapes_clip()
    clip.requires_grad_(False)
    prompts, images = make_twin_dataset(num_pairs, seed)
    with torch.no_grad():
        image_emb = torch.cat([clip.encode_image(images[i : i + 512].float() / 255) for i in range(0, len(images), 512)])
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
    held_out = max(1, num_pairs // 20)
    train_pairs = num_pairs - held_out
    encoder.requires_grad_(True)
    projection = nn.Linear(encoder.config.hidden_size, image_emb.shape[1], bias=False)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*encoder.parameters(), *projection.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    encoder.train()
    losses: list[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps)
        idx = twin_batch(train_pairs, batch_size, generator)
        loss = clip_loss(image_emb[idx], pooled_text_embedding(encoder, projection, tokens[idx]), logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    encoder.requires_grad_(False).eval()
    with torch.no_grad():
        idx = torch.arange(2 * train_pairs, 2 * num_pairs)
        text_emb = pooled_text_embedding(encoder, projection, tokens[idx])
        sims = image_emb[idx] @ text_emb.T
        blocks = torch.stack([sims[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] for i in range(held_out)])  # [P, 2, 2]
        twin_accuracy = (blocks.diagonal(dim1=1, dim2=2) > blocks.flip(-1).diagonal(dim1=1, dim2=2)).float().mean()
    return {
        "steps": steps,
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "retrieval_i2t": float((sims.argmax(1) == torch.arange(len(idx))).float().mean()),
        "twin_accuracy": float(twin_accuracy),
        "held_out_pairs": held_out,
    }
