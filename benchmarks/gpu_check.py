"""The GPU part of benchmarks/gpu_check.sh: reward throughput on full-size random-weight architectures.

Per reward (aesthetic on OpenAI ViT-L/14, CLIPScore on transformers CLIP-L/14, HPS v2.1 on open_clip ViT-H-14,
PickScore on transformers CLIP-H/14, ImageReward on BLIP ViT-L/16 + BERT) and dtype (fp32, bf16, fp16):
images/s of the forward on pre-made tensors at batch 1 and at batch 32, and the official per-image path
(`score([pil], [prompt])`, fp32: PIL preprocessing + one forward per image). Models are built directly on the
GPU (random init there is fast); nothing is downloaded. Writes JSON to --out and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from prefalign.rewards.aesthetic import AestheticHead, AestheticReward
from prefalign.rewards.base import RewardInfo
from prefalign.rewards.clip_common import open_clip_tokenizer, write_clip_processor_files
from prefalign.rewards.hps import OpenClipReward
from prefalign.rewards.imagereward import build_imagereward
from prefalign.rewards.pickscore import HFClipReward, read_image_processor_cfg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_CLIP = {  # transformers CLIP configs of openai/clip-vit-large-patch14 and CLIP-ViT-H-14 (PickScore)
    "L": ({"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
          {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
           "patch_size": 14}, 768),
    "H": ({"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24},
          {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
           "patch_size": 14}, 1024),
}


def _info(name: str) -> RewardInfo:
    return RewardInfo(name, "random weights (gpu_check)", True, 224, "n/a")


def _open_clip(name: str, quick_gelu: bool) -> tuple[torch.nn.Module, dict]:
    cfg = {**open_clip.get_model_config(name), "quick_gelu": quick_gelu}
    return open_clip.model.CLIP(**cfg).eval(), cfg


def _hf_clip(size: str, processor: Path) -> HFClipReward:
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    text, vision, proj = HF_CLIP[size]
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(processor))
    image_cfg = read_image_processor_cfg(processor)
    return HFClipReward(model, tokenizer, _info(f"clip-{size}"), image_cfg=image_cfg, scale=None)


def build(name: str, processor: Path) -> torch.nn.Module:
    """A full-size reward with random weights, created on the current default device (the GPU)."""
    if name == "aesthetic":
        model, cfg = _open_clip("ViT-L-14", quick_gelu=True)
        return AestheticReward(model.visual, AestheticHead(cfg["embed_dim"]), _info(name), 224)
    if name == "hpsv2.1":
        model, cfg = _open_clip("ViT-H-14", quick_gelu=False)
        return OpenClipReward(model, open_clip_tokenizer(cfg), _info(name), pipeline="letterbox", image_size=224)
    if name == "clipscore":
        return _hf_clip("L", processor)
    if name == "pickscore":
        return _hf_clip("H", processor)
    return build_imagereward(device=torch.get_default_device())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rate(fn: Callable[[], object], images: int, device: str) -> float:
    fn()  # warm-up (cuDNN/cuBLAS plans, allocator)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return images / (time.perf_counter() - start)


def measure(name: str, processor: Path, pil: list[Image.Image], device: str) -> list[dict]:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the previous reward's weights
    with torch.device(device):
        reward = build(name, processor).requires_grad_(False)
    rows = []
    prompts = [f"a photo number {i}" for i in range(32)]
    per_image = _rate(lambda: [reward.score([im], [p]) for im, p in zip(pil[:8], prompts, strict=False)], 8, device)
    pixels = torch.stack([reward.preprocess_pil(im) for im in pil]).to(device)
    for label, dtype in DTYPES.items():
        reward.to(dtype)
        with torch.inference_mode():
            one = _rate(lambda: [reward.reward_from_pixels(pixels[i : i + 1], prompts[i : i + 1]) for i in range(8)],
                        8, device)
            many = _rate(lambda: reward.reward_from_pixels(pixels, prompts), 32, device)
        rows.append({"reward": name, "dtype": label, "batch1_ips": one, "batch32_ips": many,
                     "official_per_image_fp32_ips": per_image, "batch32_over_official": many / per_image})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rewards", default="aesthetic,clipscore,hpsv2.1,pickscore,imagereward")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    processor = write_clip_processor_files(args.out.parent / "clip_processor")
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).resize((512, 512)) for _ in range(32)]
    rows = [row for name in args.rewards.split(",") for row in measure(name, processor, pil, args.device)]
    gpu = args.device.startswith("cuda")
    report = {"device": torch.cuda.get_device_name() if gpu else args.device, "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
