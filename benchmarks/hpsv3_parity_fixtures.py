"""Generate the HPSv3 parity fixtures by running the official `hpsv3` 1.0.0 inference code.

The official package pins transformers 4.45.2 (the project runs 5.x), so it runs in a throwaway environment
outside the repository and never in the project's venv or test suite:

    python -m venv /work/tmp-hpsv3-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /work/tmp-hpsv3-venv/lib/python3.11/site-packages/zz_main.pth
    /work/tmp-hpsv3-venv/bin/pip install --no-deps transformers==4.45.2 tokenizers==0.20.3 \
        huggingface_hub==0.25.2 trl==0.11.4 peft==0.13.2 fire==0.7.0 omegaconf==2.3.0 \
        antlr4-python3-runtime==4.9.3 termcolor tensorboard==2.18.0 tensorboard-data-server \
        protobuf==5.28.3 absl-py==2.1.0 six datasets==3.0.2
    /work/tmp-hpsv3-venv/bin/pip install aiohttp xxhash multiprocess dill==0.3.8
    # torch, torchvision, numpy, Pillow, safetensors, accelerate, ... come from the project's venv (the .pth)
    /work/tmp-hpsv3-venv/bin/pip download --no-deps hpsv3==1.0.0 -d /tmp/hpsv3whl
    python -c "import zipfile,glob; zipfile.ZipFile(glob.glob('/tmp/hpsv3whl/*.whl')[0]).extractall('/tmp/hpsv3src')"
    /work/tmp-hpsv3-venv/bin/python benchmarks/hpsv3_parity_fixtures.py --official-src /tmp/hpsv3src \
        --out tests/fixtures/hpsv3

What runs is the official code end to end: `HPSv3RewardInferencer(config_path, checkpoint_path, device="cpu")`
(`create_model_and_processor` -> `Qwen2VLRewardModelBT.from_pretrained` + `<|Reward|>` + resized embeddings,
strict `load_state_dict` of HPSv3.safetensors), `prepare_batch` (vendored qwen-vl-utils resizing, the Qwen2-VL
processor and chat template) and `reward`. Only the inputs are small: the config is HPSv3_7B.yaml with the base
model pointed at a tiny random Qwen2-VL (../shared/reference/flow_grpo_hpsv3.md §6.4) in fp32, and the
tokenizer is a byte-level BPE with Qwen2's pre-tokenizer and special tokens, trained here on the instruction
text (the real Qwen2 tokenizer cannot be fetched offline). The committed checkpoint directory is the official
layout: the base model's config and tokenizer files plus HPSv3.safetensors (official key names, lm_head
included); the base weights `from_pretrained` needs are written to a temporary directory only.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SEED = 20250805  # the date of the HPSv3 paper's arXiv version
PROMPTS = [
    "cute chibi anime cartoon fox, smiling wagging tail with a small cartoon heart above sticker",
    "A red CUBE on a blue sphere!!!",
    "",
    "Café naïve façade, 日本の庭 with a 🐱 cat",
]
# (name, width, height): native 448 (no resize), 512 -> 448, 768 -> 420 (the float-floor case), 300x200 upscaled
IMAGES = [("0_native448.png", 448, 448), ("1_sq512.png", 512, 512), ("2_sq768.png", 768, 768),
          ("3_land300x200.png", 300, 200)]
SMART_RESIZE_CASES = [(448, 448), (512, 512), (720, 720), (768, 768), (1024, 1024), (768, 1024), (200, 300),
                      (1080, 1920), (60, 900)]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# HF Qwen/Qwen2-VL-7B-Instruct chat_template.json
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value "
    "+ 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|>"
    "<|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2VLProcessor"}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}}
TINY_VISION = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "hidden_act": "quick_gelu", "mlp_ratio": 4,
               "num_heads": 4, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}


def build_tokenizer(out: Path, instruction: str, suffix: str) -> dict[str, int]:
    """A small byte-level BPE with Qwen2's normalizer/pre-tokenizer and its special tokens, saved as
    tokenizer.json + tokenizer_config.json; returns the special token ids."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([instruction, suffix, "You are a helpful assistant.", "system user assistant"],
                            trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in QWEN2_SPECIALS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
              "clean_up_tokenization_spaces": False, "split_special_tokens": False, "model_max_length": 32768,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                            "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                            "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                                            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
              "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
                                       for t, i in ids.items()}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    return ids


def build_base(base: Path, ids: dict[str, int]) -> None:
    """The tiny "Qwen2-VL-7B-Instruct": config, processor files and (random) base weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        **TINY_TEXT, vision_config=TINY_VISION, vocab_size=len(ids) + min(ids.values()),
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], tie_word_embeddings=False, torch_dtype="float32", use_cache=False)
    torch.manual_seed(SEED)
    Qwen2VLForConditionalGeneration(config).save_pretrained(str(base), safe_serialization=True)
    (base / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (base / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=1))


def randomize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh seeded weights at scales that keep activations O(1), so scores differ clearly between inputs
    (the default 0.02-std init makes every score nearly equal, which would hide preprocessing bugs)."""
    gen = torch.Generator().manual_seed(SEED)
    out = {}
    for key in sorted(state):
        shape, name = state[key].shape, key.rsplit(".", 1)[-1]
        u = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        module = key.rsplit(".", 2)[-2]
        if "norm" in module or module.startswith("ln_"):
            u = 1 + 0.1 * u if name == "weight" else 0.05 * u
        elif name == "bias":
            u = 0.05 * u
        elif "embed_tokens" in key:
            u = u * math.sqrt(3.0)
        else:
            u = u * math.sqrt(3.0 / math.prod(shape[1:]))
        out[key] = u.float().contiguous()
    return out


def fixture_images(out: Path) -> None:
    """Smooth gradients with shapes and a fine stripe pattern (so resampling matters), no noise (small PNGs)."""
    from PIL import Image, ImageDraw

    for i, (name, w, h) in enumerate(IMAGES):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin((xx + 2 * yy) / (3.0 + 2 * i))], axis=-1)
        img = Image.fromarray((base * 255).round().astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        draw.ellipse([w * 0.2, h * 0.25, w * 0.6, h * 0.7], fill=(220, 40 + 30 * i, 60))
        draw.rectangle([w * 0.55, h * 0.1, w * 0.9, h * 0.45], fill=(30, 90, 200 - 20 * i))
        img.save(out / name, optimize=True)


def _import_official(src: Path):
    sys.path.insert(0, str(src))
    import hpsv3.inference as inference
    from hpsv3.dataset import data_collator_qwen, utils

    return inference, data_collator_qwen, utils


def _sha(paths: list[Path], root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-src", type=Path, required=True, help="unpacked hpsv3-1.0.0 wheel")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    inference, collator, official_utils = _import_official(args.official_src)
    import transformers
    import yaml
    from safetensors.torch import save_file

    ckpt, images = args.out / "checkpoint", args.out / "images"
    shutil.rmtree(args.out, ignore_errors=True)
    ckpt.mkdir(parents=True)
    images.mkdir()
    fixture_images(images)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "Qwen2-VL-tiny"
        base.mkdir()
        ids = build_tokenizer(base, collator.INSTRUCTION, collator.prompt_with_special_token)
        build_base(base, ids)
        cfg = yaml.safe_load((args.official_src / "hpsv3" / "config" / "HPSv3_7B.yaml").read_text())
        cfg.update(model_name_or_path=str(base), bf16=False, torch_dtype="float32", disable_flash_attn2=True,
                   report_to="none", output_dir=str(Path(tmp) / "out"))
        config_path = Path(tmp) / "HPSv3_tiny.yaml"
        config_path.write_text(yaml.safe_dump(cfg))
        # the official model object once, to get its exact state-dict layout (with <|Reward|> and rm_head)
        (_, train_cfg, model_cfg, lora_cfg), _ = inference.parse_args_with_yaml(
            (inference.DataConfig, inference.TrainingConfig, inference.ModelConfig, inference.PEFTLoraConfig),
            str(config_path), is_train=False)
        model, _, _ = inference.create_model_and_processor(model_cfg, lora_cfg, train_cfg)
        weights = randomize(model.state_dict())
        save_file(weights, str(ckpt / "HPSv3.safetensors"))
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                     "chat_template.json"):
            shutil.copy(base / name, ckpt / name)
        del model

        rm = inference.HPSv3RewardInferencer(str(config_path), str(ckpt / "HPSv3.safetensors"), device="cpu")
        paths = [str(images / name) for name, _, _ in IMAGES]
        batch = rm.prepare_batch(paths, PROMPTS)
        with torch.no_grad():
            batched = rm.reward(paths, PROMPTS)
            single = torch.cat([rm.reward([p], [q]) for p, q in zip(paths, PROMPTS, strict=True)])
            pil = rm.reward([official_utils.Image.open(p) for p in paths], PROMPTS)
        message = [{"role": "user", "content": [{"type": "image", "image": paths[0]},
                                                {"type": "text", "text": "TEXT"}]}]
        chat = rm.processor.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
        mask = batch["attention_mask"].bool()
        offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                             batch["image_grid_thw"].prod(-1).cumsum(0)]).tolist()
        pixel_stats = [{"sum": batch["pixel_values"][a:b].double().sum().item(),
                        "abs_sum": batch["pixel_values"][a:b].double().abs().sum().item(),
                        "first": batch["pixel_values"][a, :8].tolist()} for a, b in itertools.pairwise(offsets)]
        expected = {
            "generator": "benchmarks/hpsv3_parity_fixtures.py",
            "official": "hpsv3 1.0.0 (PyPI wheel): HPSv3RewardInferencer.prepare_batch / reward, fp32 on CPU",
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
            "official_source_sha256": _sha([p for p in (args.official_src / "hpsv3").rglob("*.py")
                                            if "cohp" not in p.parts], args.official_src),
            "prompts": PROMPTS,
            "images": [name for name, _, _ in IMAGES],
            "reward_token_id": rm.model.special_token_ids[0],
            "chat_template_text": chat[0] if isinstance(chat, list) else chat,
            "smart_resize": [[h, w, *official_utils.smart_resize(h, w, min_pixels=200704, max_pixels=200704)]
                             for h, w in SMART_RESIZE_CASES],
            "input_ids": [row[m].tolist() for row, m in zip(batch["input_ids"], mask, strict=True)],
            "image_grid_thw": batch["image_grid_thw"].tolist(),
            "pixel_stats": pixel_stats,
            "reward_batched": batched.tolist(),
            "reward_single": single.tolist(),
            "reward_pil": pil.tolist(),
        }
    (args.out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: expected[k] for k in ("reward_batched", "reward_single", "image_grid_thw")}, indent=1))


if __name__ == "__main__":
    main()
