"""Generator specs: parsing, recorded sampler settings and NFE, determinism per (prompt, seed), errors."""

import json
import os

import pytest
import torch

from prefalign.bench import generators as gen_module
from prefalign.bench.generators import (
    BenchGenerator,
    parse_spec,
    register_generator,
    resolve_generator,
    sampler_nfe,
    source_generator,
)
from prefalign.diffusion.tiny import save_tiny_pipeline
from prefalign.errors import PrefalignError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipes") / "tiny-sd"
    save_tiny_pipeline(directory, "sd", sample_size=16)
    return directory


def test_spec_strings_and_mappings(tmp_path):
    assert parse_spec("shapes-ideal") == ("shapes-ideal", None, {}, "shapes-ideal")
    kind, target, options, label = parse_spec(
        "shapes-teacher:/x/y?steps=5&name=mine&negative=low+quality%2C+blurry"
    )
    assert (kind, target, label) == ("shapes-teacher", "/x/y", "mine")
    assert options == {"steps": "5", "negative": "low quality, blurry"}
    assert parse_spec({"spec": "diffusers:/p?steps=3", "cfg": 1.0, "name": "sd"}) == (
        "diffusers",
        "/p",
        {"steps": "3", "cfg": 1.0},
        "sd",
    )
    assert parse_spec(str(tmp_path))[:2] == ("diffusers", str(tmp_path))  # a run directory
    with pytest.raises(PrefalignError, match="unknown kind 'nope'"):
        parse_spec("nope:thing")


def test_diffusers_pipeline_settings_nfe_and_determinism(sd_dir):
    generator = resolve_generator(f"diffusers:{sd_dir}?steps=2&cfg=3&negative=ugly&resolution=8")
    assert generator.label.startswith("diffusers:")
    assert generator.settings == {
        "kind": "diffusers",
        "model": str(sd_dir.resolve()),
        "pipeline": "StableDiffusionPipeline",
        "sampler": "ddim",
        "steps": 2,
        "cfg": 3.0,
        "eta": 0.0,
        "negative": "ugly",
        "resolution": 8,
        "dtype": "float32",
    }
    assert generator.nfe == 4 and sampler_nfe(2, 1.0) == 2  # CFG doubles the evaluations; cfg 1 does not
    source = generator.build(CPU)
    batch = source(["a red cube", "a blue ball", "a cat"], [11, 12, 13])
    assert batch.shape == (3, 3, 8, 8) and batch.min() >= 0 and batch.max() <= 1
    alone = source(["a blue ball"], [12])
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)  # per (prompt, seed), not batch-mates
    assert not torch.allclose(source(["a blue ball"], [99]), alone)
    default = resolve_generator(f"diffusers:{sd_dir}")
    assert (default.settings["steps"], default.settings["cfg"]) == (
        50,
        7.5,
    )  # StableDiffusionPipeline defaults
    assert default.settings["resolution"] == 32  # unet sample_size 16 × the VAE's factor 2


def test_cache_key_follows_settings_and_weights(sd_dir, tmp_path):
    key = resolve_generator(f"diffusers:{sd_dir}?steps=2").key
    assert (
        resolve_generator(f"diffusers:{sd_dir}?steps=2&name=other").key == key
    )  # the label is not a setting
    assert resolve_generator(f"diffusers:{sd_dir}?steps=3").key != key
    config = sd_dir / "unet" / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "retrained" weights on disk
    try:
        assert resolve_generator(f"diffusers:{sd_dir}?steps=2").key != key
    finally:
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_option_and_path_errors_are_one_line(sd_dir, tmp_path, monkeypatch):
    with pytest.raises(PrefalignError, match="unknown option"):
        resolve_generator(f"diffusers:{sd_dir}?stepz=2")
    with pytest.raises(PrefalignError, match="steps='x' is not a valid int"):
        resolve_generator(f"diffusers:{sd_dir}?steps=x")
    with pytest.raises(PrefalignError, match="dtype=float8"):
        resolve_generator(f"diffusers:{sd_dir}?dtype=float8")
    with pytest.raises(PrefalignError, match="shapes pretrain"):
        resolve_generator(f"shapes-teacher:{tmp_path / 'none'}")
    with pytest.raises(PrefalignError, match="takes no path or options"):
        resolve_generator("shapes-ideal?steps=3")
    with pytest.raises(PrefalignError, match=r"model_index\.json is missing"):
        resolve_generator(str(tmp_path))  # a directory that holds no pipeline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrefalignError, match="offline or unreachable"):
        resolve_generator("diffusers:someone/some-model-that-is-not-cached")


def test_a_run_directory_with_a_saved_pipeline_is_a_generator(sd_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for item in sd_dir.iterdir():
        (run / item.name).symlink_to(item)
    (run / "config.yaml").write_text("seed: 0\n")
    generator = resolve_generator(f"{run}?steps=1&cfg=1")
    assert generator.settings["kind"] == "diffusers" and generator.nfe == 1
    assert generator.build(CPU)(["x"], [0]).shape == (1, 3, 32, 32)


def test_register_a_kind_and_wrap_a_source(monkeypatch):
    monkeypatch.setattr(gen_module, "_KINDS", dict(gen_module._KINDS))
    calls = []

    def grey(prompts, seeds):
        calls.append(len(prompts))
        return torch.full((len(prompts), 3, 4, 4), 0.5)

    register_generator(
        "grey", lambda target, options: BenchGenerator("grey", {"kind": "grey"}, 1, lambda d: grey)
    )
    generator = resolve_generator("grey?name=flat")
    assert generator.label == "flat" and generator.build(CPU)(["a", "b"], [0, 1]).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_generator("grey", lambda target, options: None)
    wrapped = source_generator("mine", grey, nfe=3, settings={"steps": 3})
    assert wrapped.nfe == 3 and wrapped.settings == {"kind": "source", "label": "mine", "steps": 3}
    assert json.dumps(wrapped.settings) and wrapped.key != source_generator("mine", grey).key
