"""Many rewards in one pass (prefalign.rewards.multi) against per-image calls and the bare batched forward.

Every reward is built from random weights saved to disk and loaded through its real loader (nothing is
downloaded), at ViT-B/16 size so the run stays short on a shared 2-core CPU: aesthetic and CLIPScore
(open_clip backend) on one open_clip ViT-B/16 file (so they share the image tower), HPS v2.1 on the same file
(letterbox pixels: no sharing), PickScore on a transformers CLIP-B/16, ImageReward on a ViT-B/16-sized BLIP.
Per reward, on the same image files and prompts:
- (a) per image: `reward.score([path], [prompt])` in a loop -- the official calling pattern, one image at a
  time through the official preprocessing;
- (b) bare: `reward_from_pixels` on pre-made, preprocessed tensors in batches -- the model's limit here;
- pass: `RewardPass({name: reward})` from the files (decoding and preprocessing in worker processes).
Then all five in one pass vs the sum of the single passes, aesthetic + CLIPScore vs CLIPScore alone, and the
opt-in fast mode (bf16 autocast + channels-last) with its largest |Δscore| against fp32.

Wall and CPU seconds are both reported: on a shared machine the CPU seconds (this process plus its decoding
workers) are the stable measure. Usage (what RESULTS.md records):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rewards_multi_pass.py --n 32 --batch 8 --skip-fast
    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/rewards_multi_pass.py --n 8 --batch 8 --skip-fast
    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/rewards_multi_pass.py --n 8 --batch 8 --skip-single
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from prefalign.rewards import load
from prefalign.rewards.aesthetic import AestheticHead
from prefalign.rewards.clip_common import write_clip_processor_files
from prefalign.rewards.imagereward import ImageRewardArch, build_imagereward
from prefalign.rewards.multi import RewardPass

NAMES = ("aesthetic", "clipscore", "hpsv2.1", "pickscore", "imagereward")
IR_ARCH = {"vision_width": 768, "vision_depth": 12, "vision_heads": 12, "text_depth": 12}


def _save_models(root: Path) -> dict[str, dict]:
    """Random ViT-B/16-size weights of every reward, saved where its loader expects them; load() kwargs."""
    torch.manual_seed(0)
    cfg = {**open_clip.get_model_config("ViT-B-16"), "quick_gelu": True}
    (root / "vit_b16.json").write_text(json.dumps(cfg))
    clip = open_clip.model.CLIP(**{k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")})
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / "clip.safetensors"))
    save_file(AestheticHead(cfg["embed_dim"]).state_dict(), str(root / "head.safetensors"))
    from transformers import CLIPConfig, CLIPModel

    hf = CLIPModel(CLIPConfig(text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                                           "num_hidden_layers": 12},
                              vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                             "num_hidden_layers": 12, "patch_size": 16}, projection_dim=512))
    hf.save_pretrained(root / "pick")
    processor = write_clip_processor_files(root / "processor")
    ir = build_imagereward(ImageRewardArch(**IR_ARCH))
    state = ir.state_dict()
    torch.save({official: state[mine] for official, mine in ir.official_key_map().items()}, root / "ir.pt")
    (root / "ir_arch.json").write_text(json.dumps(IR_ARCH))
    clip_file, model_config = root / "clip.safetensors", root / "vit_b16.json"
    return {
        "aesthetic": {"checkpoint": root / "head.safetensors", "clip_checkpoint": clip_file,
                      "model_config": model_config},
        "clipscore": {"checkpoint": clip_file, "backend": "open_clip", "model_config": model_config,
                      "clip_at_zero": False},  # random-weight cosines are often < 0: keep them visible
        "hpsv2.1": {"checkpoint": clip_file, "model_config": model_config},
        "pickscore": {"checkpoint": root / "pick", "processor": processor},
        "imagereward": {"checkpoint": root / "ir.pt", "arch": root / "ir_arch.json"},
    }


def _images(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):  # smooth random images (PNG decode cost like real renders, not like noise)
        small = rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)
        path = root / f"img{i}.png"
        Image.fromarray(small).resize((512, 640), Image.BICUBIC).save(path)
        paths.append(str(path))
    return paths


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # decoding workers, once they have exited
    return time.process_time() + children.ru_utime + children.ru_stime


def _timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds incl. decoding workers, result) of one call."""
    start, cpu = time.perf_counter(), _cpu()
    result = fn()
    return time.perf_counter() - start, _cpu() - cpu, result


def _pass_scores(models: dict, paths: list[str], prompts: list[str], batch: int, fast: bool = False) -> dict:
    out: dict[str, list[float]] = {name: [] for name in models}
    for result in RewardPass(models, batch_size=batch, workers=1, fast=fast).run(paths, prompts):
        for name in models:
            out[name] += result.scores[name]
    return {name: torch.tensor(v) for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("/tmp/rewards_multi_pass.json"))
    parser.add_argument("--skip-single", action="store_true", help="only the multi-reward and fast-mode rows")
    parser.add_argument("--skip-fast", action="store_true", help="leave out the fast-mode row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    root = Path(tempfile.mkdtemp(prefix="multi_pass_"))
    kwargs = _save_models(root)
    models = {name: load(name, **kwargs[name]) for name in NAMES}
    paths = _images(root, args.n)
    prompts = [f"a photo of object {i % 3}" for i in range(args.n)]
    _pass_scores(models, paths[:2], prompts[:2], 2)  # warm-up: first-call allocations, worker start paths
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
                    "n": args.n, "batch": args.batch, "rewards": {}}
    for name, model in ({} if args.skip_single else models).items():
        per_image = _timed(lambda m=model: [m.score([p], [t]) for p, t in zip(paths, prompts, strict=True)])
        pixels = torch.stack([model.preprocess_pil(Image.open(p).convert("RGB")) for p in paths])
        with torch.inference_mode():
            bare = _timed(lambda m=model, x=pixels: [m.reward_from_pixels(x[i : i + args.batch],
                                                                           prompts[i : i + args.batch])
                                                      for i in range(0, args.n, args.batch)])
        single = _timed(lambda m=model, k=name: _pass_scores({k: m}, paths, prompts, args.batch))
        exact = model.score(paths, prompts, batch_size=args.batch)
        report["rewards"][name] = {
            "wall_s": {"per_image": per_image[0], "bare": bare[0], "pass": single[0]},
            "cpu_s": {"per_image": per_image[1], "bare": bare[1], "pass": single[1]},
            "pass_over_bare_wall": bare[0] / single[0], "pass_over_per_image_wall": per_image[0] / single[0],
            "max_abs_delta_vs_score": float((single[2][name] - exact).abs().max()),
        }
        print(name, json.dumps(report["rewards"][name]), flush=True)
    five = _timed(lambda: _pass_scores(models, paths, prompts, args.batch))
    report["five_rewards"] = {"wall_s": five[0], "cpu_s": five[1]}
    print("five_rewards", json.dumps(report["five_rewards"]), flush=True)
    pair = _timed(lambda: _pass_scores({k: models[k] for k in ("aesthetic", "clipscore")}, paths, prompts, args.batch))
    report["aesthetic_plus_clipscore"] = {"wall_s": pair[0], "cpu_s": pair[1]}
    print("aesthetic_plus_clipscore", json.dumps(report["aesthetic_plus_clipscore"]), flush=True)
    if not args.skip_fast:
        fast = _timed(lambda: _pass_scores(models, paths, prompts, args.batch, fast=True))
        report["fast_mode"] = {"wall_s": fast[0], "cpu_s": fast[1], "speedup_wall": five[0] / fast[0],
                               "max_abs_delta": {k: float((fast[2][k] - five[2][k]).abs().max()) for k in models}}
        print("fast_mode", json.dumps(report["fast_mode"]), flush=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
