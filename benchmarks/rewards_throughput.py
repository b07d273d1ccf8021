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

HPSv3 (opt-in, `--rewards hpsv3`) is Qwen2-VL-7B's or -2B's layer shapes (`--hpsv3-size`) at a reduced depth
(`--hpsv3-depth`; the 7B in fp32 needs 33 GB) with the parity fixture's tokenizer, and adds (b) the bare batched forward on the inputs `score`
would build, pre-made. The official package pins transformers 4.45 and cannot be imported here, so its per-image
path (`HPSv3RewardInferencer.reward([image], [prompt])`) runs from its parts: the wheel's own
`process_vision_info` (`--hpsv3-src`), the Qwen2-VL processor as the package builds it, and the forward as
HPSv3Model reproduces it. |Δμ| > 1e-4 between the paths fails the run.

Usage (what RESULTS.md records):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rewards_throughput.py --n 4 --prompts 2 --bf16-n 2 \
        --threads 2 --out /tmp/rewards_throughput.json
    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/rewards_throughput.py --rewards hpsv3 \
        --hpsv3-src /tmp/hpsv3-1.0.0 --hpsv3-size 7b --hpsv3-depth 1,1 --n 8 --batch 4 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from prefalign.rewards.hpsv3 import (
    IMAGE_PIXELS,
    INSTRUCTION,
    REWARD_SUFFIX,
    REWARD_TOKEN,
    HPSv3Model,
    _official_pixels,
)
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


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float, float]:
    """-> (result, wall s, process CPU s, peak RSS MB); CPU seconds are the stable measure on a shared machine."""
    with PeakRSS() as mem:
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return out, seconds, cpu_seconds, mem.peak


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


# ------------------------------------------------------------------------------------------------------ HPSv3
HPSV3_BASE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hpsv3" / "checkpoint"
QWEN2VL_TEXT = {  # Qwen2-VL-{2B,7B}-Instruct decoder widths (28 layers, head dim 128 in both)
    "2b": {"hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4},
}
QWEN2VL_ROPE = {"max_position_embeddings": 32768, "rope_theta": 1e6,
                "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]}}
QWEN2VL_VISION = {"embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_act": "quick_gelu", "in_chans": 3,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}  # 32 blocks in both sizes
HPSV3_TOL = 1e-4  # |Δμ| batched vs official and vs bare, fp32 (the parity test's tolerance)


def build_hpsv3(size: str, text_layers: int, vision_layers: int) -> HPSv3Model:
    """Qwen2-VL-2B / 7B layer shapes at reduced depth (of 28 decoder layers / 32 vision blocks), the parity fixture's
    tokenizer and chat template (official layout), random weights scaled to O(1) activations."""
    from hpsv3_parity_fixtures import randomize  # run as a script, so benchmarks/ is on sys.path
    from transformers import AutoTokenizer, Qwen2VLConfig

    tokenizer = AutoTokenizer.from_pretrained(str(HPSV3_BASE), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # as load_hpsv3
    cfg = json.loads((HPSV3_BASE / "config.json").read_text())
    text = QWEN2VL_TEXT[size]
    cfg.update(text, **QWEN2VL_ROPE, num_hidden_layers=text_layers, vocab_size=len(tokenizer),
               vision_config={**QWEN2VL_VISION, "hidden_size": text["hidden_size"], "depth": vision_layers})
    model = HPSv3Model(Qwen2VLConfig(**cfg, attn_implementation="sdpa"), tokenizer)
    model.load_state_dict(randomize(model.state_dict()))
    return model.requires_grad_(False)


def hpsv3_official_parts(src: Path) -> tuple[Any, Callable]:
    """The Qwen2-VL processor as `create_model_and_processor` builds it (right padding, `<|Reward|>` added; the
    PIL backend = transformers 4.45's slow processor) and the wheel's own `process_vision_info`, loaded from its
    file (importing the package pulls in its training stack, pinned to transformers 4.45)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(HPSV3_BASE), padding_side="right", use_fast=False)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    spec = importlib.util.spec_from_file_location("hpsv3_dataset_utils", src / "hpsv3" / "dataset" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return processor, module.process_vision_info


def official_hpsv3(reward: HPSv3Model, processor: Any, process_vision_info: Callable, images: list[Image.Image],
                   prompts: list[str]) -> torch.Tensor:
    """`HPSv3RewardInferencer.reward([image], [prompt])[:, 0]` per image: `prepare_batch` (its message, the
    wheel's `process_vision_info`, the processor's chat template and patching), then `Qwen2VLRewardModelBT.forward`
    as HPSv3Model.forward reproduces it (the 4.45 module layout does not exist in transformers 5). Under no_grad,
    which the shipped `reward` lacks."""
    out = []
    for pil, prompt in zip(images, prompts, strict=True):
        message = [[{"role": "user", "content": [
            {"type": "image", "image": pil, "min_pixels": IMAGE_PIXELS, "max_pixels": IMAGE_PIXELS},
            {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + REWARD_SUFFIX}]}]]
        image_inputs, _ = process_vision_info(message)
        batch = processor(text=processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True),
                          images=image_inputs, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = reward(batch["pixel_values"], batch["image_grid_thw"], batch["input_ids"],
                            batch["attention_mask"])
        out.append(logits[0, 0])
    return torch.stack(out)


def run_hpsv3(images: list[Image.Image], prompts: list[str], src: Path, size: str, depth: tuple[int, int],
              batch: int) -> dict:
    """batched `score` vs (a) the official per-image path vs (b) the bare forward on pre-made inputs, one model."""
    start = time.perf_counter()
    reward = build_hpsv3(size, *depth)
    processor, process_vision_info = hpsv3_official_parts(src)
    build_s = time.perf_counter() - start
    premade = [reward.model_inputs([_official_pixels(im) for im in images[i:i + batch]], prompts[i:i + batch])
               for i in range(0, len(images), batch)]  # exactly what `score` feeds the forward
    reward.score(images[:1], prompts[:1])  # warm-up for all three paths
    batched, batched_s, batched_cpu, batched_mb = timed(lambda: reward.score(images, prompts, batch_size=batch))
    ref, official_s, official_cpu, official_mb = timed(
        lambda: official_hpsv3(reward, processor, process_vision_info, images, prompts))
    with torch.no_grad():
        bare, bare_s, bare_cpu, bare_mb = timed(lambda: torch.cat([reward(*x)[:, 0] for x in premade]))
    n = len(images)
    return {
        "reward": "hpsv3",
        "architecture": f"Qwen2-VL-{size.upper()} layer shapes, {depth[0]}/28 decoder layers, {depth[1]}/32 vision blocks",
        "params_m": sum(p.numel() for p in reward.parameters()) / 1e6,
        "weights_mb": sum(p.numel() * p.element_size() for p in reward.parameters()) / 2**20,
        "build_s": build_s, "n_images": n, "batch": batch,
        "tokens_per_image": [int(t) for x in premade for t in x[3].sum(1)],
        "batched_img_per_s": n / batched_s, "official_img_per_s": n / official_s, "bare_img_per_s": n / bare_s,
        "cpu_s": {"batched": batched_cpu, "official": official_cpu, "bare": bare_cpu},
        "speedup": official_s / batched_s, "speedup_cpu": official_cpu / batched_cpu,
        "batched_over_bare": bare_s / batched_s, "batched_over_bare_cpu": bare_cpu / batched_cpu,
        "peak_rss_mb": {"batched": batched_mb, "official": official_mb, "bare": bare_mb},
        "max_abs_diff_batched_vs_official": float((batched - ref).abs().max()),
        "max_abs_diff_batched_vs_bare": float((batched - bare).abs().max()),
        "score_range_fp32": float(batched.max() - batched.min()),
    }


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
    name: str, images: list[Image.Image], prompts: list[str], proc_dir: Path, bf16_n: int, laion_head: Path,
    batch: int,
) -> dict:
    start = time.perf_counter()
    reward, official = build(name, proc_dir, laion_head)
    build_s = time.perf_counter() - start
    reward.score(images[:1], prompts[:1])  # warm-up (allocator, kernels) for both paths
    batched, batched_s, _, batched_mb = timed(lambda: reward.score(images, prompts, batch_size=batch))
    ref, official_s, _, official_mb = timed(lambda: official(reward, images, prompts))
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
    low, low_s, _, _ = timed(lambda: reward.score(sub_i, sub_p, batch_size=len(sub_i)))
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
    parser.add_argument("--batch", type=int, default=None, help="batch size of the batched path (default: all --n)")
    parser.add_argument("--rewards", default="aesthetic,hpsv2.1,pickscore,clipscore", help="any of these, hpsv3")
    parser.add_argument("--hpsv3-src", type=Path, default=None,
                        help="the unpacked hpsv3-1.0.0 wheel (its process_vision_info runs the official path)")
    parser.add_argument("--hpsv3-size", choices=sorted(QWEN2VL_TEXT), default="7b", help="HPSv3 layer widths")
    parser.add_argument("--hpsv3-depth", default="1,1", help="HPSv3 decoder layers,vision blocks (full: 28,32)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    shared = Path(__file__).resolve().parents[1].parent / "shared"
    head = shared / "data" / "weights" / "laion-aesthetic-v2" / "sac+logos+ava1-l14-linearMSE.pth"
    parser.add_argument("--laion-head", type=Path, default=head, help="real LAION head (random if absent)")
    args = parser.parse_args()
    names = args.rewards.split(",")
    if "hpsv3" in names and not (args.hpsv3_src and (args.hpsv3_src / "hpsv3" / "dataset" / "utils.py").is_file()):
        parser.error("--hpsv3-src: give the directory of the unpacked hpsv3-1.0.0 wheel (holding hpsv3/dataset/utils.py)")
    depth = tuple(int(k) for k in args.hpsv3_depth.split(","))
    batch = args.batch or args.n
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, prompts = make_inputs(args.n, args.prompts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc_dir = write_clip_processor_files(Path(tmp) / "proc")
        for name in names:
            if name == "hpsv3":
                rows.append(run_hpsv3(images, prompts, args.hpsv3_src, args.hpsv3_size, depth, batch))
            else:
                rows.append(run_one(name, images, prompts, proc_dir, args.bf16_n, args.laion_head, batch))
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
    worst = max((max(r["max_abs_diff_batched_vs_official"], r["max_abs_diff_batched_vs_bare"])
                 for r in rows if r["reward"] == "hpsv3"), default=0.0)
    if worst > HPSV3_TOL:
        raise SystemExit(f"hpsv3: batched scores differ from the official / bare path by {worst:.2e} > {HPSV3_TOL}")


if __name__ == "__main__":
    main()
