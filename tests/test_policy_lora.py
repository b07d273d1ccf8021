"""LoRA on denoisers without diffusers' `add_adapter` (PixArtTransformer2DModel in diffusers 0.42): peft's
`inject_adapter_in_model` fallback trains adapters only, disables them for the reference, checkpoints and merges
into a loadable pipeline directory, and drives a Diffusion-DPO run. The same helpers on the flow transformers."""

import math

import pytest
import torch

from prefalign.config import resolve_config
from prefalign.diffusion.models import DiffusionModel
from prefalign.diffusion.tiny import save_tiny_pipeline, tiny_pipeline
from prefalign.errors import PrefalignError
from prefalign.shapes.labels import make_preference_dataset
from prefalign.train import dpo
from prefalign.train.common import MetricsLog
from prefalign.train.policy import DEFAULT_LORA_TARGETS, Policy, add_lora, merge_lora, set_lora_enabled


def _inputs(model: DiffusionModel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *model.sample_shape), generator=g)
    return x, torch.tensor([100, 700]), model.encode_prompts(["a red circle", "two blue squares"])


def test_pixart_lora_trains_adapters_only_references_the_base_and_merges(tmp_path):
    model = tiny_pipeline("pixart")
    assert not hasattr(model.denoiser, "add_adapter")  # the case the fallback exists for
    x, t, cond = _inputs(model)
    base = model(x, t, cond).detach()
    frozen = {n: p.detach().clone() for n, p in model.denoiser.named_parameters()}
    policy = Policy(model, lora_rank=4, reference="adapter")
    trainable = {n for n, p in policy.model.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert torch.allclose(policy.model(x, t, cond), base, atol=1e-6)  # LoRA B starts at zero

    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    for _ in range(2):  # the second step moves A as well (B is nonzero after the first)
        optimizer.zero_grad()
        policy.model(x, t, cond).square().mean().backward()
        optimizer.step()
    for name, p in policy.model.denoiser.named_parameters():
        if name not in trainable:
            assert torch.equal(p, frozen[name.replace(".base_layer.", ".")]), name
    moved = policy.model(x, t, cond).detach()
    assert (moved - base).abs().max() > 1e-3

    assert torch.allclose(policy.reference(x, t, cond), base, atol=1e-6)  # adapters disabled = the base model
    assert torch.equal(policy.model(x, t, cond), moved)  # ... and enabled again afterwards, still trainable
    assert {n for n, p in policy.model.denoiser.named_parameters() if p.requires_grad} == trainable

    fresh = Policy(tiny_pipeline("pixart"), lora_rank=4, reference="adapter")
    fresh.load_trainable_state(policy.trainable_state())
    assert torch.allclose(fresh.model(x, t, cond), moved, atol=1e-6)

    policy.save_pretrained(tmp_path / "merged")
    merged = DiffusionModel.from_pretrained(tmp_path / "merged")
    assert merged.family == "pixart" and not any("lora" in k for k in merged.denoiser.state_dict())
    assert torch.allclose(merged(x, t, cond), moved, atol=1e-5)
    assert any(".lora_A." in n for n, _ in policy.model.denoiser.named_parameters())  # the policy keeps its LoRA


def test_lora_targets_that_match_nothing_are_one_line_errors():
    with pytest.raises(PrefalignError, match=r"lora_targets \['nothing_here'\] to PixArtTransformer2DModel"):
        Policy(tiny_pipeline("pixart"), lora_rank=4, lora_targets=["nothing_here"])


def test_two_step_lora_dpo_on_tiny_pixart(tmp_path):
    make_preference_dataset(tmp_path / "pairs", 8, seed=5)
    model_dir = save_tiny_pipeline(tmp_path / "base", "pixart")
    overrides = [f"model={model_dir}", f"data.source={tmp_path / 'pairs' / 'train.parquet'}", "train.steps=2",
                 "train.batch_size=2", "train.lr=1e-2", "train.log_every=1", "train.checkpoint_every=2",
                 "eval.every=0", "policy.lora_rank=4", "policy.reference=adapter"]
    config = resolve_config(dpo.DEFAULTS, None, overrides, out=str(tmp_path / "run"), device="cpu")
    out = dpo.train(config, tmp_path / "run", log=lambda _: None)
    rows = MetricsLog(tmp_path / "run" / "metrics.csv").rows
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference before the first update
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["trainable"]
    assert state and all(".lora_" in name for name in state)
    x, t, cond = _inputs(tiny_pipeline("pixart"))
    aligned, base = DiffusionModel.from_pretrained(out), DiffusionModel.from_pretrained(model_dir)
    assert aligned.family == "pixart"
    assert not torch.allclose(aligned(x, t, cond), base(x, t, cond), atol=1e-6)


def _flow_transformers():
    """Tiny SD3 and FLUX transformers with a forward on fixed inputs (they have diffusers' add_adapter)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    text, pooled, t = torch.randn(2, 5, 16), torch.randn(2, 16), torch.tensor([10.0, 500.0])
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=16, out_channels=4)
    x = torch.randn(2, 4, 8, 8)
    yield sd3, lambda m: m(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=(2, 2, 4))
    packed, image_ids, text_ids = torch.randn(2, 16, 4), torch.zeros(16, 3), torch.zeros(5, 3)
    yield flux, lambda m: m(packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=t / 1000,
                            img_ids=image_ids, txt_ids=text_ids, return_dict=False)[0]


@torch.no_grad()
def test_lora_helpers_on_the_flow_transformers():
    for denoiser, forward in _flow_transformers():
        base = forward(denoiser)
        add_lora(denoiser, 4, 4.0, DEFAULT_LORA_TARGETS)
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
        adapted = forward(denoiser)
        assert (adapted - base).abs().max() > 1e-3
        set_lora_enabled(denoiser, False)
        assert torch.allclose(forward(denoiser), base, atol=1e-6)
        set_lora_enabled(denoiser, True)
        merge_lora(denoiser)
        assert not any("lora" in k for k in denoiser.state_dict())
        assert torch.allclose(forward(denoiser), adapted, atol=1e-5)
