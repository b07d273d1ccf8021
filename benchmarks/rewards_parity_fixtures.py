"""Generate the golden parity fixtures in tests/fixtures/rewards/ by running the *official* reward code.

Every reference below runs the upstream code path on fixed random weights in tiny configs of the real
architectures (the official code builds them from a config, so tiny ones are allowed), on fixed images and
prompts. Weights are rounded to fp16 before the references run and stored as fp16 safetensors, so the adapters
load bit-identical fp32 values. `tests/test_rewards_parity.py` then asserts |adapter - official| <= 1e-4
(fp32).

References (pinned, run in a throwaway venv, never in the project venv):
- HPS v2/v2.1: PyPI `hpsv2==1.2.0`, its own `hpsv2.img_score.score(img_path, prompt, cp=...)`, with
  `model_dict` pre-filled by its vendored `hpsv2.src.open_clip.create_model_and_transforms(...)` using exactly
  the arguments of `img_score.initialize_model` except `pretrained=None` (as `hpsv2/evaluation.py` does) and a
  tiny config added with its `add_model_config`. Once with the installed torchvision default (antialias=True)
  and once with `hpsv2.src.open_clip.transform.F.resize` wrapped to pass antialias=False (torchvision < 0.17
  behaviour).
- PickScore: the README code on transformers 4.27.3 (the version PickScore pins): `AutoProcessor` /
  `AutoModel` `from_pretrained`, `get_image_features` / `get_text_features`, L2 norm, `logit_scale.exp() *
  cos`.
- CLIPScore (transformers backend): torchmetrics 1.4.0 `functional.multimodal.clip_score._clip_score_update`
  (100 cos per sample; the public metric then averages `max(., 0)`) on the same tiny CLIP. torchmetrics slices
  overlong token sequences to 77 without an end token, unlike the tokenizer's truncation=True; that prompt is
  therefore also recorded via the PickScore-style processor call (`clipscore_hf_truncated`).
- CLIPScore (open_clip backend): open_clip's README usage: `create_model_and_transforms(name,
  pretrained=FILE)`, `preprocess`, `get_tokenizer`, `encode_image` / `encode_text`, L2 norm, 100 max(cos, 0).
- LAION aesthetic v2: `simple_inference.py` of christophschuhmann/improved-aesthetic-predictor (its `MLP` and
  `normalized` copied below verbatim except that `MLP` subclasses nn.Module instead of pl.LightningModule,
  which only adds training hooks), on the OpenAI `clip` package (PyPI `openai-clip==1.0.1`):
  `clip.model.build_model` (what `clip.load` calls) `.float()` as `clip.load` does on CPU, and
  `clip.clip._transform`.

Exact environment used (Python 3.11.7):
    python3.11 -m venv /tmp/refvenv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/refvenv/lib/python3.11/site-packages/zz_main.pth
    /tmp/refvenv/bin/pip install --no-deps hpsv2==1.2.0 clint==0.5.1 args==0.1.0 openai-clip==1.0.1 \
        transformers==4.27.3 tokenizers==0.13.3 huggingface_hub==0.13.4 torchmetrics==1.4.0 \
        lightning-utilities==0.11.2
    # the hpsv2 1.2.0 wheel lacks its BPE vocabulary (HPSv2 issue #30); copy open_clip's identical file in:
    cp .venv/lib/python3.11/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz \
        /tmp/refvenv/lib/python3.11/site-packages/hpsv2/src/open_clip/
    OMP_NUM_THREADS=1 /tmp/refvenv/bin/python benchmarks/rewards_parity_fixtures.py
The .pth line makes the project venv's torch 2.14.1 / torchvision 0.29.1 / open_clip 3.3.0 visible behind the
pinned packages (the venv's own site-packages come first). tkinter is present in this Python, so hpsv2's stray
`from turtle import forward` imports fine.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO / "tests" / "fixtures" / "rewards"

PROMPTS = [
    "a red circle on a blue background",
    "",
    "a photo of a cat sitting on a windowsill " * 12,  # > 77 tokens: truncated
    "Ünïcödé café ☕ with emoji 🎨",
    "two dogs playing in the snow",
    "A painting of an ocean with clouds and birds, day time, low depth field effect",
]
# (width, height): portrait/landscape, odd crop margins (round vs floor), exact 224, very wide, upsampling.
SIZES = [(300, 200), (200, 300), (259, 257), (224, 224), (480, 120), (64, 48)]

OPEN_CLIP_TINY = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 16, "head_width": 8, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 2},
}
# OpenAI `build_model` infers heads as width // 64, so the aesthetic tower needs width 64.
AESTHETIC_TINY = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 64, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}
HF_TINY = {
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
    },
    "vision_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 224,
        "patch_size": 14,
    },
    "projection_dim": 8,
    "logit_scale_init_value": math.log(50.0),
}


def perturb_and_round(module: torch.nn.Module, seed: int) -> None:
    """Shift every parameter by noise (so LayerNorm gains/biases differ from 1/0 and a mis-mapped key shows),
    then round to fp16-representable values so the stored fp16 file reloads bit-identically in fp32."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            p.copy_(p.half().float())


def half_state(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v.detach().half().contiguous() for k, v in module.state_dict().items() if k.startswith(prefix)}


def make_images() -> list[Path]:
    """Smooth gradients + a disc + mild noise; deterministic, small PNGs."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin((xx + yy) / 17.0 + i)], -1)
        disc = ((xx - w * 0.6) ** 2 + (yy - h * 0.4) ** 2) < (min(w, h) * 0.25) ** 2
        base[disc] = [0.9, 0.2 + 0.1 * i, 0.1]
        img = np.clip(base * 255 + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        path = FIXTURES / "images" / f"img{i}.png"
        Image.fromarray(img).save(path, optimize=True)
        paths.append(path)
    return paths


def hps_reference(paths: list[Path], tmp: Path) -> dict[str, list[float]]:
    import hpsv2.img_score as img_score
    import hpsv2.src.open_clip.transform as hps_transform
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms

    cfg_path = tmp / "hps_tiny.json"
    cfg_path.write_text(json.dumps(OPEN_CLIP_TINY))
    add_model_config(cfg_path)
    torch.manual_seed(1)
    model, _, preprocess_val = create_model_and_transforms(
        "hps_tiny",
        None,
        precision="amp",
        device="cpu",
        jit=False,
        force_quick_gelu=False,
        force_custom_text=False,
        force_patch_dropout=False,
        force_image_size=None,
        pretrained_image=False,
        image_mean=None,
        image_std=None,
        light_augmentation=True,
        aug_cfg={},
        output_dict=True,
        with_score_predictor=False,
        with_region_predictor=False,
    )
    torch.manual_seed(1)
    perturb_and_round(model, seed=1)
    save_file(half_state(model), str(FIXTURES / "openclip_tiny.safetensors"))
    (FIXTURES / "openclip_tiny.json").write_text(json.dumps(OPEN_CLIP_TINY, indent=1))
    cp = tmp / "hps_tiny.pt"
    torch.save(
        {
            "state_dict": {
                k: v.float() for k, v in load_file(str(FIXTURES / "openclip_tiny.safetensors")).items()
            }
        },
        cp,
    )
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)  # skips the 4 GB laion download

    def run() -> list[float]:
        return [
            float(img_score.score([str(p)], prompt, cp=str(cp))[0])
            for p, prompt in zip(paths, PROMPTS, strict=True)
        ]

    out = {"hpsv2": run()}
    resize = hps_transform.F.resize
    hps_transform.F.resize = lambda img, size, interpolation, **kw: resize(
        img, size, interpolation, antialias=False
    )
    try:
        out["hpsv2_no_antialias"] = run()
    finally:
        hps_transform.F.resize = resize
    return out


def open_clip_reference(paths: list[Path], tmp: Path) -> list[float]:
    import open_clip

    cfg_path = tmp / "openclip_ref_tiny.json"
    cfg_path.write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(cfg_path)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "openclip_ref_tiny", pretrained=str(FIXTURES / "openclip_tiny.safetensors")
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer("openclip_ref_tiny")
    scores = []
    with torch.no_grad():
        for path, prompt in zip(paths, PROMPTS, strict=True):
            image_features = model.encode_image(preprocess(Image.open(path)).unsqueeze(0))
            text_features = model.encode_text(tokenizer([prompt]))
            image_features /= image_features.norm(dim=-1, keepdim=True)
            text_features /= text_features.norm(dim=-1, keepdim=True)
            scores.append(float(torch.clamp(100 * (image_features * text_features).sum(-1), min=0)[0]))
    return scores


# --- verbatim from improved-aesthetic-predictor/simple_inference.py (base class swapped, see docstring) ---
class MLP(torch.nn.Module):
    def __init__(self, input_size, xcol="emb", ycol="avg_rating"):
        super().__init__()
        self.input_size = input_size
        self.xcol = xcol
        self.ycol = ycol
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(self.input_size, 1024),
            # nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            # nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            # nn.ReLU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            # nn.ReLU(),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def normalized(a, axis=-1, order=2):
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


# ---------------------------------------------------------------------------------------------------------


def aesthetic_reference(paths: list[Path]) -> list[float]:
    import clip
    import open_clip

    torch.manual_seed(2)
    oc = open_clip.model.CLIP(**AESTHETIC_TINY)
    perturb_and_round(oc, seed=2)
    visual = half_state(oc, "visual.")
    save_file(visual, str(FIXTURES / "aesthetic_visual.safetensors"))
    (FIXTURES / "aesthetic_tiny.json").write_text(json.dumps(AESTHETIC_TINY, indent=1))
    # The aesthetic never uses the text tower; build_model only needs one of matching output width.
    dummy_text = {
        "text_projection": torch.randn(64, AESTHETIC_TINY["embed_dim"]),
        "positional_embedding": torch.randn(77, 64),
        "token_embedding.weight": torch.randn(8, 64),
        "ln_final.weight": torch.ones(64),
        "ln_final.bias": torch.zeros(64),
        "logit_scale": torch.tensor(4.6),
    }
    text_keys = clip.model.CLIP(32, 224, 1, 64, 14, 77, 8, 64, 1, 1).state_dict()
    dummy_text.update(
        {k: torch.randn(v.shape) * 0.02 for k, v in text_keys.items() if k.startswith("transformer.")}
    )
    model2 = (
        clip.model.build_model({**{k: v.float() for k, v in visual.items()}, **dummy_text}).float().eval()
    )
    preprocess = clip.clip._transform(model2.visual.input_resolution)

    head = MLP(AESTHETIC_TINY["embed_dim"])
    with (
        torch.no_grad()
    ):  # spread the random head's outputs so a preprocessing slip moves them well past 1e-4
        head.layers[0].weight.mul_(30.0)
    perturb_and_round(head, seed=3)
    save_file(half_state(head), str(FIXTURES / "aesthetic_head.safetensors"))
    head.eval()
    scores = []
    for path in paths:
        image = preprocess(Image.open(path)).unsqueeze(0)
        with torch.no_grad():
            image_features = model2.encode_image(image)
        im_emb_arr = normalized(image_features.cpu().detach().numpy())
        prediction = head(torch.from_numpy(im_emb_arr).type(torch.FloatTensor))
        scores.append(float(prediction[0, 0]))
    return scores


def hf_references(paths: list[Path], tmp: Path) -> dict[str, list[float]]:
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from transformers import AutoModel, AutoProcessor, CLIPConfig, CLIPModel

    from prefalign.rewards.clip_common import write_clip_processor_files

    torch.manual_seed(4)
    model = CLIPModel(CLIPConfig(**HF_TINY))
    perturb_and_round(model, seed=4)
    out_dir = FIXTURES / "hf_clip_tiny"
    out_dir.mkdir(exist_ok=True)
    model.config.to_json_file(out_dir / "config.json")
    state = {k: v for k, v in half_state(model).items() if not k.endswith("position_ids")}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})  # transformers checks it
    # torchmetrics / AutoProcessor read the processor from the model directory: assemble one in tmp.
    model_dir = write_clip_processor_files(tmp / "hf_clip_tiny")
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).write_bytes((out_dir / name).read_bytes())

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    pick, trunc, tm = [], [], []
    with torch.no_grad():
        for path, prompt in zip(paths, PROMPTS, strict=True):
            pil = Image.open(path).convert("RGB")  # eval_preference_predictor.py converts to RGB
            image_inputs = processor(
                images=[pil], padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            text_inputs = processor(
                text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            cos = (text_embs @ image_embs.T)[0]
            pick.append(float(model.logit_scale.exp() * cos[0]))
            trunc.append(float(torch.clamp(100 * cos[0], min=0)))
            chw = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
            tm.append(float(torch.clamp(_clip_score_update(chw, prompt, model, processor)[0], min=0)[0]))
    return {"pickscore": pick, "clipscore_hf_truncated": trunc, "clipscore_hf_torchmetrics": tm}


def main() -> None:
    import clip
    import hpsv2
    import torchmetrics
    import torchvision
    import transformers

    torch.set_num_threads(1)
    (FIXTURES / "images").mkdir(parents=True, exist_ok=True)
    paths = make_images()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        expected = hps_reference(paths, tmp)
        expected["clipscore_openclip"] = open_clip_reference(paths, tmp)
        expected["aesthetic"] = aesthetic_reference(paths)
        expected.update(hf_references(paths, tmp))
    meta = {
        "images": [p.name for p in paths],
        "prompts": PROMPTS,
        "overlong_prompt_index": 2,
        "generated_with": {
            "hpsv2": getattr(hpsv2, "__version__", "1.2.0"),
            "openai-clip": getattr(clip, "__version__", "1.0.1"),
            "transformers": transformers.__version__,
            "torchmetrics": torchmetrics.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "script": "benchmarks/rewards_parity_fixtures.py",
        },
    }
    (FIXTURES / "expected.json").write_text(
        json.dumps({**meta, "scores": expected}, indent=1, ensure_ascii=False)
    )
    print(json.dumps(expected, indent=1))


if __name__ == "__main__":
    main()
