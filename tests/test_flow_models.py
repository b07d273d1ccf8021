"""SD3 and FLUX families on tiny random-weight models of the real architectures, with diffusers parity."""

from __future__ import annotations

import pytest
import torch

from prefalign.diffusion.families.flux import pack_latents, unpack_latents
from prefalign.diffusion.generate import sample_latents
from prefalign.diffusion.models import DiffusionModel
from prefalign.diffusion.schedules import FlowSchedule
from prefalign.diffusion.tiny import save_tiny_pipeline

SIZE = 8  # latents [4, 8, 8]; the tiny VAEs decode to 16×16 images
PROMPTS = ["a red circle on a blue square", "two green triangles"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flow-pipelines")
    return {family: save_tiny_pipeline(root / family, family, seed=2, sample_size=SIZE) for family in ("sd3", "flux")}


def _x_T(seed: int = 5) -> torch.Tensor:
    return torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _our_sample(model: DiffusionModel, x_T: torch.Tensor, scale: float, steps: int) -> torch.Tensor:
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts([""])
    return sample_latents(
        lambda x, t: model.guided(x, t, cond, uncond, scale), x_T, model.schedule, steps,
        **model.sampler_kwargs(x_T.shape[1:]),
    )


def test_parity_stable_diffusion_3_pipeline(saved):
    from diffusers import StableDiffusion3Pipeline

    model = DiffusionModel.from_pretrained(saved["sd3"])
    assert (model.family, model.prediction_type) == ("sd3", "flow_prediction")
    assert model.schedule == FlowSchedule(shift=3.0) and model.sample_shape == (4, SIZE, SIZE)
    pipe = StableDiffusion3Pipeline.from_pretrained(saved["sd3"])
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts(["", ""])
    assert cond.hidden_states.shape == (2, 77 + 256, 96) and cond.added["pooled_projections"].shape == (2, 40)
    torch.testing.assert_close(cond.hidden_states, embeds.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.added["pooled_projections"], pooled.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(uncond.hidden_states, negative.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond.added["pooled_projections"], negative_pooled.detach(), atol=1e-6, rtol=1e-6)
    x_T = _x_T()
    reference = pipe(
        PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=4.0, latents=x_T, output_type="latent"
    ).images
    torch.testing.assert_close(_our_sample(model, x_T, 4.0, 3), reference, atol=1e-5, rtol=1e-5)


def test_parity_flux_pipeline_with_guidance_embedding(saved):
    from diffusers import FluxPipeline

    model = DiffusionModel.from_pretrained(saved["flux"])
    assert (model.family, model.prediction_type) == ("flux", "flow_prediction") and model.schedule.dynamic
    pipe = FluxPipeline.from_pretrained(saved["flux"])
    with torch.no_grad():  # T5 attention takes another kernel with autograd on (~1e-5 apart)
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu")
    cond = model.encode_prompts(PROMPTS)
    assert cond.hidden_states.shape == (2, 512, 48) and text_ids.abs().sum() == 0
    torch.testing.assert_close(cond.hidden_states, embeds.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.added["pooled_projections"], pooled.detach(), atol=1e-6, rtol=1e-6)
    x_T = _x_T()
    assert torch.equal(unpack_latents(pack_latents(x_T), SIZE, SIZE), x_T)
    reference = pipe(
        PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=3.5, latents=pack_latents(x_T),
        output_type="latent",
    ).images
    ours = _our_sample(model, x_T, 3.5, 3)
    torch.testing.assert_close(ours, unpack_latents(reference, SIZE, SIZE), atol=1e-5, rtol=1e-5)
    # The guidance value reaches the network: another scale gives another sample.
    assert not torch.allclose(_our_sample(model, x_T, 1.0, 3), ours, atol=1e-4)


def test_flow_models_predict_x0_and_decode(saved):
    model = DiffusionModel.from_pretrained(saved["sd3"])
    cond = model.encode_prompts(PROMPTS)
    x0 = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn_like(x0)
    t = torch.tensor([300.0, 900.0])
    x_t = model.schedule.add_noise(x0, noise, t)
    pred_x0, pred_eps = model.predict_x0(x_t, t, cond)
    velocity = model(x_t, t, cond)
    sigma = (t / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(pred_x0, x_t - sigma * velocity)
    torch.testing.assert_close(pred_eps, x_t + (1 - sigma) * velocity)
    images = model.decode(pred_x0)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    latents = model.encode_images(images, sample=False)
    z = model.vae.encode(images * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(latents, (z - 0.0609) * 1.5305)


def test_pixel_model_carries_a_flow_schedule(tmp_path):
    """The shapes teacher's layout (pixel-space UNet) with a rectified-flow schedule: save, load, sample, train."""
    from prefalign.diffusion.generate import sample_images
    from prefalign.diffusion.losses import denoising_loss
    from prefalign.diffusion.timesteps import TimestepSampler
    from prefalign.diffusion.tiny import tiny_pipeline
    from prefalign.errors import PrefalignError

    pixel = tiny_pipeline("pixel", sample_size=SIZE)
    parts = (pixel.denoiser, FlowSchedule(shift=2.0), "flow_prediction", list(pixel.text_encoders), pixel.tokenizers)
    DiffusionModel(*parts).save_pretrained(tmp_path / "teacher")
    model = DiffusionModel.from_pretrained(tmp_path / "teacher")
    assert (model.family, model.prediction_type, model.schedule) == ("pixel", "flow_prediction", parts[1])
    assert model.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    images = sample_images(model, PROMPTS, [0, 1], num_steps=3, guidance_scale=2.0)
    assert images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(images).all()
    g = torch.Generator().manual_seed(0)
    x0 = model.encode_images(torch.rand(2, 3, SIZE, SIZE, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    t = TimestepSampler("logit-normal")(2, model.schedule, g)
    output = model(model.schedule.add_noise(x0, noise, t), t, model.encode_prompts(PROMPTS))
    loss = denoising_loss(output, x0, noise, t, model.schedule, model.prediction_type)
    expected = (output - (noise - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(PrefalignError, match="rectified-flow"):
        DiffusionModel(pixel.denoiser, FlowSchedule(), "epsilon", list(pixel.text_encoders), pixel.tokenizers)
