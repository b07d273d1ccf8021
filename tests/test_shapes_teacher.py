"""The shapes teacher: builds through the shared adapter, pretrains, resumes, and drives `prefalign demo`."""

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.config import resolve_config
from prefalign.errors import PrefalignError
from prefalign.shapes.prompts import prompt_set
from prefalign.shapes.teacher import DEFAULT_ARCH, build_teacher, load_teacher
from prefalign.train import pretrain as pretrain_module
from prefalign.train.pretrain import PRETRAIN_DEFAULTS, pretrain_teacher

REPO = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = [
    "arch.unet.block_out_channels=[8, 8, 16, 16]", "arch.unet.norm_num_groups=8", "arch.unet.attention_head_dim=8",
    "arch.text.hidden_size=16", "arch.text.intermediate_size=32", "arch.text.num_hidden_layers=1",
    "arch.text.num_attention_heads=2", "data.num_examples=64", "train.batch_size=4", "train.warmup_steps=1",
    "eval.every=2", "eval.num_val=8", "eval.num_samples=2", "eval.sample_steps=2", "checkpoint_every=2",
    "text_encoder.steps=2", "text_encoder.num_pairs=16", "text_encoder.batch_size=8",
]


def tiny_config(steps: int) -> dict:
    return resolve_config(PRETRAIN_DEFAULTS, None, [*TINY_OVERRIDES, f"train.steps={steps}"])


def test_teacher_is_a_pixel_space_diffusers_model():
    model = build_teacher(tiny_config(1)["arch"])
    assert model.family == "pixel" and model.sample_shape == (3, 32, 32) and model.vae is None
    cond = model.encode_prompts(["two small red circles left of a blue square", ""])
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), cond)
    assert out.shape == (2, 3, 32, 32)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.decode(model.encode_images(images)), images)


def test_pretrain_writes_metrics_resumes_and_saves_a_loadable_teacher(tmp_path):
    first = pretrain_teacher(tiny_config(2), tmp_path)
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()
    assert metrics[0] == "step,train_loss,val_loss,oracle,lr,seconds,cpu_seconds" and len(metrics) == 2
    second = pretrain_teacher(tiny_config(4), tmp_path)  # resumes from step 2
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4"]
    assert first == second == tmp_path / "teacher"
    teacher = load_teacher(second)
    assert teacher.denoiser.dtype == torch.float32  # saved in fp16, loaded as float32
    assert not any(p.requires_grad for p in teacher.text_encoders.parameters())


def test_resume_is_exact(tmp_path):
    """Stopping at step 2 and resuming to 4 gives the same weights as running to 4 in one go."""
    pretrain_teacher(tiny_config(2), tmp_path / "a")
    pretrain_teacher(tiny_config(4), tmp_path / "a")
    pretrain_teacher(tiny_config(4), tmp_path / "b")
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_text_encoder_fine_tunes_only_when_asked(tmp_path, monkeypatch, scale):
    """The pretrained encoder moves with the UNet at `scale`·lr, and not at all at scale 0."""
    monkeypatch.setattr(pretrain_module, "pretrain_text_encoder", lambda encoder, *a, **k: encoder.requires_grad_(False)
                        and {})  # keep the initial weights, so any change is the fine-tune's
    config = resolve_config(PRETRAIN_DEFAULTS, None, [*TINY_OVERRIDES, "train.steps=2",
                                                      f"text_encoder.finetune_lr_scale={scale}"])
    pretrain_teacher(config, tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    initial = build_teacher(config["arch"], seed=0).text_encoders.state_dict()
    moved = [k for k, v in initial.items() if not torch.equal(state["model"][f"text_encoders.{k}"], v)]
    lrs = [group["lr"] for group in state["optimizer"]["param_groups"]]
    assert (len(moved) > 0, len(lrs)) == ((True, 2) if scale else (False, 1))
    assert lrs[-1] == pytest.approx((scale or 1.0) * lrs[0])
    assert not any(p.requires_grad for p in load_teacher(tmp_path / "teacher").text_encoders.parameters())


def test_nan_loss_stops_and_names_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_module, "denoising_loss", lambda *a, **k: torch.full((4,), float("nan")))
    with pytest.raises(PrefalignError, match="at step 0; last good checkpoint"):
        pretrain_teacher(tiny_config(2), tmp_path)


def test_cli_pretrain_then_demo(tmp_path):
    runner = CliRunner()
    run = tmp_path / "pretrain"
    result = runner.invoke(app, ["shapes", "pretrain", "--out", str(run), "--device", "cpu", *TINY_OVERRIDES,
                                 "train.steps=2"])
    assert result.exit_code == 0, result.output
    assert (run / "config.yaml").exists() and (run / "teacher" / "model_index.json").exists()
    demo = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(demo), "--device", "cpu", f"teacher={run / 'teacher'}",
                                 "num_prompts=2", "samples_per_prompt=2", "sampler.steps=2", "stages=[leaderboard]"])
    assert result.exit_code == 0, result.output
    board = (demo / "leaderboard" / "leaderboard.csv").read_text()
    for generator in ("teacher", "ideal render", "web data"):
        assert generator in board
    assert "shapes-oracle" in (demo / "leaderboard" / "leaderboard.md").read_text()
    grids = sorted((demo / "grids").glob("*.png"))
    assert len(grids) == 2 and Image.open(grids[0]).size[0] > 2 * 128  # labels beside the images
    assert "[demo] scale: 2 shapes-val prompts × 2 samples" in result.output
    assert (demo / "config.yaml").exists()


def test_demo_with_a_missing_teacher_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), f"teacher={tmp_path / 'nope'}"])
    assert result.exit_code == 2 and result.output.startswith("error: no shapes teacher at")
    assert len(result.output.strip().splitlines()) == 1


def test_prompt_sets_match_the_shipped_files():
    for split in ("train", "val"):
        shipped = REPO / "prompts" / f"shapes_{split}.txt"
        if not shipped.exists():
            pytest.skip(f"{shipped} not present")
        assert shipped.read_text().splitlines() == list(prompt_set(split))
    assert not set(prompt_set("val")) & set(prompt_set("train"))


def test_default_arch_is_not_mutated_by_overrides():
    before = copy.deepcopy(DEFAULT_ARCH)
    tiny_config(1)
    assert before == DEFAULT_ARCH


def test_shipped_teacher_loads_and_samples():
    from prefalign.shapes.generators import teacher_source
    from prefalign.shapes.teacher import SHIPPED_TEACHER

    assert (SHIPPED_TEACHER / "model_index.json").is_file(), "the shapes teacher checkpoint must ship"
    images = teacher_source(steps=2)(["a red circle", "two blue squares"], [0, 1])
    assert images.shape == (2, 3, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert load_teacher().prediction_type == "v_prediction"


def test_flow_teacher_pretrains_saves_and_samples(tmp_path):
    """arch.family=flow: the same parts with a rectified-flow schedule (velocity, Euler sampling)."""
    from prefalign.diffusion.schedules import FlowSchedule
    from prefalign.shapes.generators import teacher_source

    config = resolve_config(PRETRAIN_DEFAULTS, None, [*TINY_OVERRIDES, "train.steps=2", "arch.family=flow"])
    teacher = load_teacher(pretrain_teacher(config, tmp_path))
    assert isinstance(teacher.schedule, FlowSchedule) and teacher.prediction_type == "flow_prediction"
    images = teacher_source(tmp_path / "teacher", steps=3)(["a red circle"], [0])
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    with pytest.raises(PrefalignError, match=r"arch\.family 'ddpm' unknown"):
        build_teacher({**config["arch"], "family": "ddpm"})
