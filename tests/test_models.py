"""DiffusionModel adapters on tiny random-weight models of the real architectures, with diffusers parity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from prefalign.diffusion.models import Conditioning, DiffusionModel, scheduler_settings
from prefalign.diffusion.sampling import ddim_sample
from prefalign.diffusion.schedules import NoiseSchedule
from prefalign.diffusion.tiny import clip_tokenizer, save_tiny_pipeline, tiny_pipeline
from prefalign.errors import PrefalignError

SIZE = 8  # x_t is [C, 8, 8]; VAE families decode to 16×16 images
FAMILIES = ("sd", "sdxl", "pixart", "pixel")  # the VP families; SD3 and FLUX: tests/test_flow_models.py
PROMPTS = ["a red circle on a blue square", "two green triangles"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """One saved tiny pipeline directory per family."""
    root = tmp_path_factory.mktemp("pipelines")
    return {
        family: save_tiny_pipeline(root / family, family, seed=1, sample_size=SIZE) for family in FAMILIES
    }


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, saved) -> DiffusionModel:
    return DiffusionModel.from_pretrained(saved[request.param])


def _inputs(model: DiffusionModel, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.sample_shape, generator=g), torch.tensor([17, 803][:n])


def test_clip_tokenizer_matches_open_clip():
    import open_clip

    text = "A photo of a Cat, sitting!  on a mat's 123 café"
    ours = clip_tokenizer()(text).input_ids
    reference = [int(i) for i in open_clip.get_tokenizer("ViT-L-14")([text])[0] if i]
    assert ours == reference
    assert clip_tokenizer(120).model_max_length == 120


def test_encode_prompts_and_forward(model):
    cond = model.encode_prompts([*PROMPTS, ""])
    assert len(cond) == 3 and cond.hidden_states.dtype == torch.float32
    if model.family == "pixart":
        assert cond.hidden_states.shape[:2] == (3, 120) and cond.attention_mask.shape == (3, 120)
        # T5 mask covers exactly the real tokens: "" is BOS+EOS only (CLIP tokenizer), prompts are longer.
        assert cond.attention_mask[2].sum() == 2 and cond.attention_mask[0].sum() > 2
    else:
        assert cond.attention_mask is None and cond.hidden_states.shape[1] == 77
    if model.family == "sdxl":
        assert cond.hidden_states.shape[-1] == 32 + 48
        assert cond.added["text_embeds"].shape == (3, 24)
        assert cond.added["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3
        assert cond.hidden_states[2].abs().sum() == 0 and cond.added["text_embeds"][2].abs().sum() == 0
    else:
        assert cond.added == {}
    x, t = _inputs(model)
    out = model(x, t, cond.index(slice(0, 2)))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert not torch.allclose(out, model(x, t, cond.index(torch.tensor([2, 2])))), (
        "prompt must change the output"
    )
    assert torch.equal(
        model(x[:1], 17, cond.index(slice(0, 1))), model(x[:1], torch.tensor([17]), cond.index([0]))
    )


def test_guided_equals_manual_cfg(model):
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts([""])
    x, t = _inputs(model)
    expected_uncond = model(x, t, uncond.repeat_interleave(2))
    expected_cond = model(x, t, cond)
    guided = model.guided(x, t, cond, uncond, 7.5)
    torch.testing.assert_close(
        guided, expected_uncond + 7.5 * (expected_cond - expected_uncond), atol=1e-5, rtol=1e-4
    )
    assert torch.equal(model.guided(x, t, cond, uncond, 1.0), expected_cond)


def test_round_trip_identical(model, tmp_path):
    model.save_pretrained(tmp_path / "copy")
    if model.family == "pixel":  # overwriting an existing directory works and leaves no temp dirs behind
        model.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    loaded = DiffusionModel.from_pretrained(tmp_path / "copy")
    assert (loaded.family, loaded.prediction_type, loaded.sample_shape) == (
        model.family,
        model.prediction_type,
        model.sample_shape,
    )
    assert torch.equal(loaded.schedule.alphas_cumprod, model.schedule.alphas_cumprod)
    assert loaded.sampler_kwargs() == model.sampler_kwargs()
    a, b = model.encode_prompts(PROMPTS), loaded.encode_prompts(PROMPTS)
    assert torch.equal(a.hidden_states, b.hidden_states)
    x, t = _inputs(model)
    assert torch.equal(model(x, t, a), loaded(x, t, b))
    assert torch.equal(model.decode(x), loaded.decode(x))


def test_encode_decode(model):
    images = torch.rand(2, 3, *model.image_size, generator=torch.Generator().manual_seed(0))
    x0 = model.encode_images(images, sample=False)
    assert x0.shape == (2, *model.sample_shape)
    if model.vae is None:
        torch.testing.assert_close(x0, images * 2 - 1)
        torch.testing.assert_close(model.decode(x0), images)
    else:
        g = torch.Generator().manual_seed(3)
        assert not torch.equal(model.encode_images(images, generator=g), x0)  # posterior sample vs mode
    x0 = x0.clone().requires_grad_(True)
    decoded = model.decode(x0)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    decoded.mean().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0


def test_frozen_components_and_train_mode():
    model = tiny_pipeline("sd", sample_size=SIZE)
    assert not any(p.requires_grad for p in model.text_encoders.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert all(p.requires_grad for p in model.denoiser.parameters())
    model.train()
    assert model.denoiser.training and not model.text_encoders[0].training and not model.vae.training


def test_conditioning_ops():
    cond = Conditioning(
        torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.long), {"time_ids": torch.randn(2, 6)}
    )
    both = cond.cat(cond.index(torch.tensor([1])))
    assert len(both) == 3 and torch.equal(both.added["time_ids"][2], cond.added["time_ids"][1])
    rep = cond.repeat_interleave(3)
    assert len(rep) == 6 and torch.equal(rep.hidden_states[2], cond.hidden_states[0])
    half = cond.to(dtype=torch.float16)
    assert half.hidden_states.dtype == torch.float16 and half.attention_mask.dtype == torch.long
    with pytest.raises(PrefalignError):
        cond.cat(Conditioning(torch.randn(1, 5, 4)))


def test_pixel_model_without_scheduler_config_round_trips(tmp_path):
    """The shapes teacher builds DiffusionModel directly from a NoiseSchedule; saving writes trained_betas."""
    sd = tiny_pipeline("pixel", sample_size=SIZE)
    schedule = NoiseSchedule.make("squaredcos_cap_v2")
    model = DiffusionModel(sd.denoiser, schedule, "v_prediction", list(sd.text_encoders), sd.tokenizers)
    assert model.family == "pixel" and model.vae is None and model.sample_shape == (3, SIZE, SIZE)
    model.save_pretrained(tmp_path / "pixel")
    loaded = DiffusionModel.from_pretrained(tmp_path / "pixel")
    assert loaded.prediction_type == "v_prediction"
    torch.testing.assert_close(
        loaded.schedule.alphas_cumprod, schedule.alphas_cumprod, rtol=1e-12, atol=1e-12
    )
    with pytest.raises(PrefalignError, match="disagrees"):
        DiffusionModel(
            sd.denoiser,
            schedule,
            "epsilon",
            list(sd.text_encoders),
            sd.tokenizers,
            scheduler_config={"beta_schedule": "linear"},
        )


def test_pixart_micro_conditions():
    """PixArt-α 1024 (sample_size 128) uses resolution/aspect-ratio conditions; the adapter supplies them.

    (Inner width 24: the micro-condition embedders split it in thirds.)"""
    from diffusers import PixArtTransformer2DModel

    model = tiny_pipeline("pixart", sample_size=SIZE)
    torch.manual_seed(0)
    model.denoiser = PixArtTransformer2DModel(
        sample_size=SIZE,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        out_channels=8,
        caption_channels=32,
        cross_attention_dim=24,
        use_additional_conditions=True,
    )
    x, t = _inputs(model)
    assert model(x, t, model.encode_prompts(PROMPTS)).shape == x.shape


def test_offline_hub_id_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(PrefalignError) as info:
        DiffusionModel.from_pretrained("prefalign-test/no-such-pipeline")
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "cannot load 'prefalign-test/no-such-pipeline' from the Hugging Face Hub (offline or unreachable); "
        "pass a local pipeline directory or set HF_HOME to a cache that has it"
    )


def test_local_path_errors(saved, tmp_path):
    with pytest.raises(PrefalignError, match="does not exist"):
        DiffusionModel.from_pretrained(tmp_path / "nowhere" / "pipe")
    with pytest.raises(PrefalignError, match=r"model_index\.json is missing"):
        DiffusionModel.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(saved["sd"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(PrefalignError, match=r"subfolder .*vae is missing") as info:
        DiffusionModel.from_pretrained(broken)
    assert "\n" not in str(info.value)
    shutil.copytree(saved["sd"] / "vae", broken / "vae")
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(PrefalignError, match=r"unet.*config\.json"):
        DiffusionModel.from_pretrained(broken)
    index = json.loads((saved["sdxl"] / "model_index.json").read_text())
    del index["tokenizer_2"]
    shutil.copytree(saved["sdxl"], tmp_path / "xl")
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PrefalignError, match="tokenizer_2"):
        DiffusionModel.from_pretrained(tmp_path / "xl")


def test_bfloat16_load(saved):
    model = DiffusionModel.from_pretrained(saved["sd"], dtype=torch.bfloat16)
    cond = model.encode_prompts(PROMPTS)
    x, t = _inputs(model)
    out = model(x.to(torch.bfloat16), t, cond)
    assert cond.hidden_states.dtype == out.dtype == torch.bfloat16


def _our_sample(model: DiffusionModel, x_T: torch.Tensor, scale: float) -> torch.Tensor:
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts([""])
    return ddim_sample(
        lambda x, t: model.guided(x, t, cond, uncond, scale), x_T, model.schedule, 2, **model.sampler_kwargs()
    )


def test_parity_stable_diffusion_pipeline(saved):
    from diffusers import StableDiffusionPipeline

    model = DiffusionModel.from_pretrained(saved["sd"])
    pipe = StableDiffusionPipeline.from_pretrained(saved["sd"])
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    cond = model.encode_prompts(PROMPTS)
    assert torch.equal(cond.hidden_states, embeds)
    assert torch.equal(model.encode_prompts(["", ""]).hidden_states, negative)
    x, t = _inputs(model)
    assert torch.equal(model(x, t, cond), pipe.unet(x, t, encoder_hidden_states=embeds).sample)
    x_T = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(5))
    reference = pipe(
        PROMPTS,
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=4.0,
        latents=x_T,
        output_type="latent",
    ).images
    torch.testing.assert_close(_our_sample(model, x_T, 4.0), reference, atol=1e-5, rtol=1e-4)


def test_parity_stable_diffusion_xl_pipeline(saved):
    from diffusers import StableDiffusionXLPipeline

    model = DiffusionModel.from_pretrained(saved["sdxl"])
    pipe = StableDiffusionXLPipeline.from_pretrained(saved["sdxl"])
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts(["", ""])
    assert torch.equal(cond.hidden_states, embeds) and torch.equal(cond.added["text_embeds"], pooled)
    assert torch.equal(uncond.hidden_states, negative) and torch.equal(
        uncond.added["text_embeds"], negative_pooled
    )
    time_ids = pipe._get_add_time_ids(
        (16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=24
    )
    assert torch.equal(cond.added["time_ids"], time_ids.expand(2, 6))
    x, t = _inputs(model)
    added = {"text_embeds": pooled, "time_ids": time_ids.expand(2, 6)}
    assert torch.equal(
        model(x, t, cond), pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    )
    x_T = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(5))
    reference = pipe(
        PROMPTS, num_inference_steps=2, guidance_scale=4.0, latents=x_T, output_type="latent"
    ).images
    torch.testing.assert_close(_our_sample(model, x_T, 4.0), reference, atol=1e-5, rtol=1e-4)


def test_parity_pixart_pipeline(saved):
    from diffusers import PixArtAlphaPipeline

    model = DiffusionModel.from_pretrained(saved["pixart"])
    pipe = PixArtAlphaPipeline.from_pretrained(saved["pixart"])
    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, device="cpu", clean_caption=False)
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts(["", ""])
    # T5 attention takes a different kernel with autograd on (the pipeline encodes with grad): ~1e-6 apart.
    torch.testing.assert_close(cond.hidden_states, embeds.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond.hidden_states, negative.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(cond.attention_mask, mask) and torch.equal(uncond.attention_mask, negative_mask)
    x_T = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(5))
    reference = pipe(
        PROMPTS,
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=4.0,
        latents=x_T,
        output_type="latent",
        clean_caption=False,
        use_resolution_binning=False,
    ).images
    torch.testing.assert_close(_our_sample(model, x_T, 4.0), reference, atol=1e-5, rtol=1e-4)


def test_scheduler_settings_rejects_zero_snr():
    with pytest.raises(PrefalignError, match="rescale_betas_zero_snr"):
        scheduler_settings({"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True})
