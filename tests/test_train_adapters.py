"""Shippable LoRA adapters: exported from a run's checkpoint, merged back into the base teacher."""

import pytest
import torch
import yaml

from prefalign.errors import PrefalignError
from prefalign.shapes.teacher import build_teacher, load_teacher, tiny_arch
from prefalign.train.adapters import export_adapter, load_adapted_teacher
from prefalign.train.policy import Policy


def test_exported_adapter_reloads_to_the_trained_model(tmp_path, single_thread):
    build_teacher(tiny_arch()).save_pretrained(tmp_path / "teacher")
    policy = Policy(load_teacher(tmp_path / "teacher"), lora_rank=4, lora_targets=["to_q", "to_v"],
                    reference="none")
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # stands in for training
    run = tmp_path / "run"
    run.mkdir()
    lora = {"lora_rank": 4, "lora_alpha": None, "lora_targets": ["to_q", "to_v"]}
    (run / "config.yaml").write_text(yaml.safe_dump({"policy": lora}))
    torch.save({"step": 7, "trainable": policy.trainable_state()}, run / "checkpoint.pt")
    out = export_adapter(run, "dpo", tmp_path / "adapter", base=str(tmp_path / "teacher"))
    assert (out / "adapter.safetensors").stat().st_size < 50_000

    model, meta = load_adapted_teacher(out)
    assert meta["method"] == "dpo" and meta["step"] == 7
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 800])
    cond = model.encode_prompts(["a red circle", "two blue squares"])
    expected = policy.merged_denoiser()(x, t, encoder_hidden_states=cond.hidden_states).sample
    torch.testing.assert_close(model(x, t, cond), expected, atol=2e-3, rtol=0)  # adapter stored in float16
    plain = load_teacher(tmp_path / "teacher")
    assert not torch.allclose(plain(x, t, cond), expected, atol=1e-3)


def test_full_fine_tuning_runs_export_no_adapter(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"policy": {"lora_rank": None}}))
    with pytest.raises(PrefalignError, match="without LoRA"):
        export_adapter(tmp_path, "dpo", tmp_path / "adapter")
    with pytest.raises(PrefalignError, match="no adapter"):
        load_adapted_teacher(tmp_path)
