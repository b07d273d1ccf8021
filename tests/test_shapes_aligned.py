"""Aligned checkpoints shipped as int8 UNet updates against the teacher: the packing error bound, a
save → load round trip on the shipped teacher, what packing refuses, and each shipped checkpoint's meta."""

import json

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.shapes.aligned import (
    SHIPPED_ALIGNED,
    aligned_source,
    load_aligned,
    pack_update,
    save_aligned,
    unpack_update,
)
from prefalign.shapes.teacher import load_teacher

pytestmark = pytest.mark.usefixtures("single_thread")


def test_unpacked_update_is_within_half_a_step_of_each_row():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 4, 3, 3, generator=g), "b": torch.randn(8, generator=g)}
    tuned = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    packed = pack_update(base, tuned)
    assert packed["w.q"].dtype == torch.int8 and packed["w.scale"].shape == (8,) and packed["b.scale"].shape == (1,)
    restored = unpack_update(base, packed)
    for k in base:
        rows = (tuned[k] - base[k]).reshape(base[k].shape[0] if base[k].ndim > 1 else 1, -1)
        bound = rows.abs().amax(dim=1, keepdim=True) / 127 / 2 + 1e-7
        assert ((restored[k] - tuned[k]).reshape(rows.shape).abs() <= bound).all(), k
    assert torch.equal(unpack_update(base, pack_update(base, base))["w"], base["w"])


def test_save_then_load_gives_the_tuned_unet_and_samples(tmp_path):
    model = load_teacher()
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    tuned = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    save_aligned(model, tmp_path / "ck", {"sampler": {"steps": 2, "guidance": 3.0}})
    loaded, meta = load_aligned(tmp_path / "ck")
    assert meta["sampler"]["steps"] == 2
    for name, weight in loaded.denoiser.state_dict().items():
        assert torch.allclose(weight, tuned[name], atol=5e-5), name  # half an int8 step of a 1e-3 update
    source, _ = aligned_source(tmp_path / "ck", sampler={"steps": 2, "guidance": 3.0})
    images = source(["a red circle"] * 2, [0, 1])
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_packing_refuses_a_changed_text_encoder_and_a_missing_checkpoint(tmp_path):
    model = load_teacher()
    with torch.no_grad():
        next(model.text_encoders[0].parameters()).add_(1.0)
    with pytest.raises(PrefalignError, match="text encoder"):
        save_aligned(model, tmp_path / "ck", {"sampler": {"steps": 2, "guidance": 3.0}})
    with pytest.raises(PrefalignError, match="no aligned checkpoint"):
        load_aligned(tmp_path / "nothing")


@pytest.mark.parametrize("folder", sorted(p for p in SHIPPED_ALIGNED.glob("*") if p.is_dir()), ids=lambda p: p.name)
def test_shipped_checkpoints_record_how_they_were_made_and_scored(folder):
    meta = json.loads((folder / "aligned.json").read_text())
    assert {"made_by", "chosen", "sampler", "held_out"} <= meta.keys()
    assert (folder / "unet_delta.safetensors").stat().st_size < 5_000_000
    low, high = meta["held_out"]["oracle_minus_teacher"][1:]
    assert low <= meta["held_out"]["oracle_minus_teacher"][0] <= high
