"""The pipeline-native generator kind: a diffusers pipeline's own __call__, one seeded generator per image."""

import pytest
import torch

from prefalign.bench.generators import resolve_generator
from prefalign.diffusion.tiny import save_tiny_pipeline
from prefalign.errors import PrefalignError

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red circle on a blue square", "two green triangles"]
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("native") / "tiny-sd", "sd", sample_size=8)


def test_pipeline_kind_equals_the_pipeline_call(sd_dir):
    from diffusers import StableDiffusionPipeline

    generator = resolve_generator(f"pipeline:{sd_dir}?steps=2&cfg=4&resolution=16")
    assert generator.settings["sampler"] == "pipeline" and generator.nfe == 4
    images = generator.build(torch.device("cpu"))(PROMPTS, SEEDS)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    reference = pipe(
        PROMPTS, num_inference_steps=2, guidance_scale=4.0, height=16, width=16, output_type="pt",
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
    ).images
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, reference)
    # One generator per image: an image depends on its own seed, not on its batch-mates.
    alone = generator.build(torch.device("cpu"))(PROMPTS[1:], SEEDS[1:])
    torch.testing.assert_close(alone[0], images[1], atol=1e-5, rtol=1e-5)


def test_pipeline_kind_uses_the_pipeline_defaults(sd_dir):
    generator = resolve_generator(f"pipeline:{sd_dir}")
    assert generator.nfe == 50 * 2  # StableDiffusionPipeline: 50 steps, guidance 7.5
    assert {k: generator.settings[k] for k in ("steps", "cfg", "negative", "resolution")} == dict.fromkeys(
        ("steps", "cfg", "negative", "resolution")
    )
    with pytest.raises(PrefalignError, match="unknown option"):
        resolve_generator(f"pipeline:{sd_dir}?eta=1")
    with pytest.raises(PrefalignError, match="name a pipeline"):
        resolve_generator("pipeline")
