"""Throughput of the reward adapters' batched path vs the official per-image code path, peak memory, bf16.

Full-size architectures with random weights (nothing is downloaded): LAION aesthetic on OpenAI ViT-L/14,
HPS v2.1 on open_clip ViT-H-14, PickScore on transformers CLIP-ViT-H-14, CLIPScore on transformers
clip-vit-large-patch14. The same model object serves both paths, so only the calling pattern differs:
- batched: `reward.score(images, prompts, batch_size=N)` (PIL preprocessing per image, one forward per batch,
  each distinct prompt encoded once);
- official per image: the upstream loop re-enacted with the upstream preprocessing objects on one image at a
  time -- aesthetic: OpenAI `_transform` Compose + `encode_image` + numpy `normalized` + head
  (simple_inference.py); HPS: `preprocess_val` ops + `tokenizer([prompt])` + `model(image, text)` per image,
  as `hpsv2.img_score.score` does, whose additional per-call `torch.load` + `load_state_dict` of the 3.9 GB
  checkpoint is timed separately (`hps_reload_s`) and reported as its own column; PickScore / CLIPScore: the
  README / torchmetrics calls (`processor(images=...)`, `processor(text=...)`, `get_*_features`) per image.
Peak memory is the process RSS high-water mark during each path (weights included); `weights_mb` is the
parameter memory. The aesthetic head is the real LAION head from ../shared when present (else random).

Usage (what RESULTS.md records):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rewards_throughput.py --n 4 --prompts 2 --bf16-n 2 \
        --threads 2 --out /tmp/rewards_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from prefalign.rewards.aesthetic import AestheticHead, AestheticReward
from prefalign.rewards.base import RewardInfo
from prefalign.rewards.clip_common import (
    OPENAI_MEAN,
    OPENAI_STD,
    build_open_clip,
    letterbox,
    load_strict,
    load_weights,
    open_clip_tokenizer,
    write_clip_processor_files,
)
from prefalign.rewards.hps import OpenClipReward
from prefalign.rewards.pickscore import HFClipReward, read_image_processor_cfg

CLIP_H_HF = {
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                    "num_hidden_layers": 24, "vocab_size": 49408, "max_position_embeddings": 77,
                    "hidden_act": "gelu"},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                      "num_hidden_layers": 32, "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
    "projection_dim": 1024,
}  # fmt: skip
CLIP_L_HF = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "vocab_size": 49408, "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "image_size": 224},
    "projection_dim": 768,
}  # fmt: skip


class PeakRSS:
    """Sample /proc/self/status VmRSS every 5 ms in a thread; `peak` is the process high-water mark (MB).

    Absolute, model weights included: glibc keeps freed activations in the heap, so a delta over the start
    value would hide whatever the warm-up already allocated."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_inputs(n: int, n_prompts: int) -> tuple[list[Image.Image], list[str]]:
    """n synthetic 512-768 px images (varied aspect) and prompts shared by n / n_prompts images each."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        w, h = (512, 512) if i % 3 == 0 else ((768, 512) if i % 3 == 1 else (512, 640))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin((xx + yy) / (9.0 + i))], -1) * 255
        images.append(Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)))
    texts = [f"a photograph of scene number {k}, highly detailed, golden hour" for k in range(n_prompts)]
    return images, [texts[i * n_prompts // n] for i in range(n)]


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, mem.peak


# ---------------------------------------------------------------------------------- official per-image paths
def official_aesthetic(
    reward: AestheticReward, images: list[Image.Image], prompts: list[str]
) -> torch.Tensor:
    """simple_inference.py: preprocess -> encode_image -> numpy normalized() -> MLP, one image per call."""
    preprocess = T.Compose([
        T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
        lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])  # fmt: skip
    out = []
    for pil in images:
        with torch.no_grad():
            feats = reward.visual(preprocess(pil).unsqueeze(0).to(reward.dtype)).float().numpy()
            l2 = np.atleast_1d(np.linalg.norm(feats, 2, -1))
            l2[l2 == 0] = 1
            out.append(reward.head(torch.from_numpy(feats / l2[:, None]).float())[0, 0])
    return torch.stack(out)


def official_hps(reward: OpenClipReward, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """hpsv2.img_score.score's loop body (minus its per-call checkpoint reload, timed separately)."""
    out = []
    for pil, prompt in zip(images, prompts, strict=True):
        with torch.no_grad():
            image = T.functional.normalize(
                letterbox(T.functional.to_tensor(pil), 224, True), OPENAI_MEAN, OPENAI_STD
            )
            text = reward.tokenizer([prompt])
            img_f = F.normalize(
                reward.model.encode_image(image.unsqueeze(0).to(reward.dtype)).float(), dim=-1
            )
            txt_f = F.normalize(reward.model.encode_text(text).float(), dim=-1)
            out.append(torch.diagonal(img_f @ txt_f.T)[0])
    return torch.stack(out)


def official_hf(
    reward: HFClipReward, processor, images: list[Image.Image], prompts: list[str]
) -> torch.Tensor:
    """PickScore README / torchmetrics calls, one image per call."""
    model, out = reward.model, []
    for pil, prompt in zip(images, prompts, strict=True):
        with torch.no_grad():
            image_inputs = processor(images=[pil], return_tensors="pt")
            text_inputs = processor(
                text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            pooled = model.vision_model(
                pixel_values=image_inputs["pixel_values"].to(reward.dtype)
            ).pooler_output
            img_f = F.normalize(model.visual_projection(pooled).float(), dim=-1)
            txt = model.text_model(**text_inputs).pooler_output
            txt_f = F.normalize(model.text_projection(txt).float(), dim=-1)
            cos = (txt_f @ img_f.T)[0, 0]
            out.append(model.logit_scale.exp().float() * cos if reward.scale is None else reward.scale * cos)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ the models
def build(name: str, proc_dir: Path, laion_head: Path) -> tuple[torch.nn.Module, Callable]:
    info = RewardInfo(name, "random weights", True, 224, "benchmark")
    if name == "aesthetic":
        model, _ = build_open_clip("ViT-L-14-quickgelu", None)
        head = AestheticHead(768)
        if laion_head.exists():
            load_strict(head, load_weights(laion_head, "LAION head", "shared"), "LAION head")
        reward = AestheticReward(model.visual, head, info, 224)
        return reward.eval().requires_grad_(False), official_aesthetic
    if name == "hpsv2.1":
        model, cfg = build_open_clip("ViT-H-14", None)
        reward = OpenClipReward(model, open_clip_tokenizer(cfg), info, pipeline="letterbox", image_size=224)
        return reward.eval().requires_grad_(False), official_hps
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    processor = AutoProcessor.from_pretrained(str(proc_dir))
    config = CLIP_H_HF if name == "pickscore" else CLIP_L_HF
    scale = None if name == "pickscore" else 100.0
    reward = HFClipReward(
        CLIPModel(CLIPConfig(**config)),
        processor.tokenizer,
        info,
        image_cfg=read_image_processor_cfg(proc_dir),
        scale=scale,
    )
    return reward.eval().requires_grad_(False), lambda r, ims, ps: official_hf(r, processor, ims, ps)


def hps_reload_seconds(reward: OpenClipReward) -> float:
    """What `hpsv2.score` adds per call: torch.load of the whole checkpoint + load_state_dict."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        path = Path(tmp) / "hps.pt"
        torch.save({"state_dict": reward.model.state_dict()}, path)
        start = time.perf_counter()
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        reward.model.load_state_dict(state)
        seconds = time.perf_counter() - start
        del state
    return seconds


def run_one(
    name: str, images: list[Image.Image], prompts: list[str], proc_dir: Path, bf16_n: int, laion_head: Path
) -> dict:
    start = time.perf_counter()
    reward, official = build(name, proc_dir, laion_head)
    build_s = time.perf_counter() - start
    reward.score(images[:1], prompts[:1])  # warm-up (allocator, kernels) for both paths
    batched, batched_s, batched_mb = timed(lambda: reward.score(images, prompts, batch_size=len(images)))
    ref, official_s, official_mb = timed(lambda: official(reward, images, prompts))
    row = {
        "reward": name,
        "params_m": sum(p.numel() for p in reward.parameters()) / 1e6,
        "weights_mb": sum(p.numel() * p.element_size() for p in reward.parameters()) / 2**20,
        "build_s": build_s,
        "n_images": len(images),
        "n_prompts": len(set(prompts)),
        "batched_img_per_s": len(images) / batched_s,
        "official_img_per_s": len(images) / official_s,
        "speedup": official_s / batched_s,
        "batched_peak_rss_mb": batched_mb,
        "official_peak_rss_mb": official_mb,
        "max_abs_diff_batched_vs_official": float((batched - ref).abs().max()),
    }
    if name == "hpsv2.1":
        reload_s = hps_reload_seconds(reward)
        row["hps_reload_s"] = reload_s
        row["speedup_vs_shipped_hpsv2_score"] = (official_s + reload_s * len(images)) / batched_s
    target = reward.visual if name == "aesthetic" else reward  # the aesthetic head stays fp32 (official)
    target.to(torch.bfloat16)
    sub_i, sub_p = images[:bf16_n], prompts[:bf16_n]
    reward.score(sub_i[:1], sub_p[:1])  # bf16 kernels warm up separately
    low, low_s, _ = timed(lambda: reward.score(sub_i, sub_p, batch_size=len(sub_i)))
    row["bf16_img_per_s"] = len(sub_i) / low_s
    row["bf16_max_abs_diff"] = float((low - batched[:bf16_n]).abs().max())
    row["score_range_fp32"] = float(batched.max() - batched.min())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="images per reward")
    parser.add_argument("--prompts", type=int, default=2, help="distinct prompts (images share them evenly)")
    parser.add_argument("--bf16-n", type=int, default=4, help="images for the bf16 agreement check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rewards", default="aesthetic,hpsv2.1,pickscore,clipscore")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    shared = Path(__file__).resolve().parents[1].parent / "shared"
    head = shared / "data" / "weights" / "laion-aesthetic-v2" / "sac+logos+ava1-l14-linearMSE.pth"
    parser.add_argument("--laion-head", type=Path, default=head, help="real LAION head (random if absent)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, prompts = make_inputs(args.n, args.prompts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc_dir = write_clip_processor_files(Path(tmp) / "proc")
        for name in args.rewards.split(","):
            rows.append(run_one(name, images, prompts, proc_dir, args.bf16_n, args.laion_head))
            print(json.dumps(rows[-1]), flush=True)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_avg_at_end": os.getloadavg(),
    }
    print(json.dumps(machine))
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
