"""`prefalign train-reward`: CLI outputs, the NaN guard, exact resume, clean head training, the step-aware reward
round trip, the demo stage, and a 2-process gloo run that matches the 1-process run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.config import deep_merge
from prefalign.errors import PrefalignError
from prefalign.rewards import load
from prefalign.rewards.trainable import build_scorer, load_scorer
from prefalign.runs import start_run
from prefalign.shapes.clip import load_shapes_clip
from prefalign.shapes.labels import make_preference_dataset
from prefalign.train import reward
from prefalign.train.policy import load_base_model
from prefalign.train.reward_scorer import init_from

runner = CliRunner()
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rewards"
TINY = {
    "device": "cpu",
    "data": {"source": "shapes:web?n=24&seed=0", "val_limit": 12},
    "train": {"steps": 4, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2},
    "eval": {"every": 2, "timesteps": [0, 900]},
}


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision; these tests train
    several times in one process (see the note on make_accelerator in the report)."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def cli(*args: str) -> SimpleNamespace:
    result = runner.invoke(app, ["train-reward", *args])
    return SimpleNamespace(code=result.exit_code, output=result.output, exception=result.exception)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "scorer" / "model.safetensors"))


def test_cli_nan_guard_and_exact_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(tmp_path)
    straight = cli("--config", str(config), "--out", str(tmp_path / "a"))
    assert straight.code == 0, straight.output
    assert "reward model written to" in straight.output
    evals, metrics = pd.read_csv(tmp_path / "a" / "eval.csv"), pd.read_csv(tmp_path / "a" / "metrics.csv")
    assert evals["step"].tolist() == [0, 2, 4] and metrics["step"].tolist() == [4]
    assert {"acc", "acc_true", "acc_t0", "acc_t900", "acc_true_t900", "val_loss"} <= set(evals.columns)
    assert {"loss", "temperature", "lr", "compute"} <= set(metrics.columns)
    assert evals["fb_calls"].tolist() == [0, 2 * 4 * 2, 4 * 4 * 2]  # steps × pairs × images
    assert (tmp_path / "a" / "metrics.png").stat().st_size > 0 and (tmp_path / "a" / "eval.png").stat().st_size > 0
    summary = yaml.safe_load((tmp_path / "a" / "summary.json").read_text())
    assert 0.5 < summary["label_noise_ceiling"] < 1

    # The same run, stopped by a non-finite loss at step 3 (counted from 0), then resumed from the step-2 checkpoint.
    calls = {"n": 0}
    pair_scores = reward._pair_scores

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        r0, r1 = pair_scores(*args, **kwargs)
        return (r0 * float("nan"), r1) if calls["n"] == 4 else (r0, r1)

    monkeypatch.setattr(reward, "_pair_scores", poisoned)
    stopped = cli("--config", str(config), "--out", str(tmp_path / "b"))
    assert stopped.code == 2
    assert "training loss became nan at step 3" in stopped.output and "(step 2)" in stopped.output
    monkeypatch.setattr(reward, "_pair_scores", pair_scores)
    refused = cli("--config", str(config), "--out", str(tmp_path / "b"))
    assert refused.code == 2 and "pass --resume" in refused.output
    resumed = cli("--config", str(config), "--out", str(tmp_path / "b"), "--resume")
    assert resumed.code == 0, resumed.output
    assert "at step 2" in resumed.output
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, straight_rows in (("eval.csv", evals), ("metrics.csv", metrics)):
        resumed_rows = pd.read_csv(tmp_path / "b" / name)
        assert resumed_rows.drop(columns="seconds").equals(straight_rows.drop(columns="seconds")), name


def test_lora_step_aware_vit_loads_and_scores_noisy_inputs(tmp_path: Path) -> None:
    """LoRA + gradient checkpointing on a tiny open_clip ViT-H-14 layout (HPS-like), through the registry."""
    vit = ["model.backbone=open_clip:ViT-H-14", f"model.checkpoint={FIXTURES / 'openclip_tiny.safetensors'}",
           f"model.options.model_config={FIXTURES / 'openclip_tiny.json'}", "model.train=lora", "model.lora_rank=2",
           "train.gradient_checkpointing=true", "train.steps=1", "eval.every=1"]
    config, run_dir = start_run(reward.DEFAULTS, tiny_config(tmp_path), vit, out=str(tmp_path / "run"))
    scorer_dir = reward.train(config, run_dir, log=lambda _: None)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)["trainable"]["scorer"]
    assert checkpoint and all(".lora_" in k or "adaLN" in k or k.startswith("time.") for k in checkpoint)
    model = load("step-aware", checkpoint=scorer_dir)
    base = load_base_model("shapes-teacher")
    g = torch.Generator().manual_seed(0)
    images, noise = torch.rand(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    t, prompts = torch.tensor([10, 600]), ["a red circle", "two blue squares"]
    x0_images = reward.noised_x0(base, images, t, noise, prompts, guidance=3.0)
    assert (x0_images[0] - images[0]).abs().mean() < 0.05  # x̂0 at small t is close to the image itself
    x_t = base.schedule.add_noise(images * 2 - 1, noise, t)
    assert torch.allclose(model.score_noisy(x_t, t, prompts), model.score_x0(x0_images, t, prompts), atol=1e-5)
    assert model.score(images, prompts).shape == (2,)


def test_clean_head_on_parquet_with_held_out_captions(tmp_path: Path) -> None:
    make_preference_dataset(tmp_path / "labels", n_pairs=24, seed=1)
    overrides = {
        "seed": 0, "device": "cpu", "out": str(tmp_path / "run"),
        "data": {"source": str(tmp_path / "labels" / "train.parquet"), "val_split": None, "val_fraction": 0.25},
        "model": {"kind": "head", "time_conditioned": False, "options": {"with_text": True}},
        "step_aware": {"base_model": None},
        "loss": {"kind": "btt", "learn_temperature": True, "learn_tie_theta": True},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 0, "lr": 1e-2, "mixed_precision": "bf16"},
        "eval": {"every": 3},
    }
    config = deep_merge(reward.DEFAULTS, overrides)
    logs: list[str] = []
    with pytest.raises(PrefalignError, match=r"data\.val_source"):
        reward.train(deep_merge(config, {"data": {"val_split": "validation"}}), tmp_path / "x", log=logs.append)
    with pytest.raises(PrefalignError, match=r"step_aware\.base_model"):
        reward.train(deep_merge(config, {"model": {"time_conditioned": True}}), tmp_path / "y", log=logs.append)
    scorer_dir = reward.train(config, tmp_path / "run", log=logs.append)
    assert any("held out" in line for line in logs)
    row = pd.read_csv(tmp_path / "run" / "eval.csv").iloc[-1]
    assert 0 <= row["acc_clean"] <= 1
    assert pd.read_csv(tmp_path / "run" / "metrics.csv").iloc[-1]["temperature"] != 1.0  # learnable temperature moved
    saved = weights(tmp_path / "run")
    shipped = load_shapes_clip().state_dict()
    frozen = [k for k in saved if k.startswith("backbone.model.")]
    assert frozen and all(torch.equal(saved[k], shipped[k.removeprefix("backbone.model.")]) for k in frozen)
    assert any(not torch.equal(saved[k], torch.zeros_like(saved[k])) for k in saved if k.startswith("head."))
    trained = load("trained", checkpoint=scorer_dir)
    assert trained.score(torch.rand(2, 3, 32, 32), ["a red circle"] * 2).shape == (2,)


def test_demo_stage_records_the_scorer_and_bucket_accuracies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_train = {"steps": 2, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2}
    monkeypatch.setattr(reward, "DEMO_PAIRS", {"train": 24, "validation": 12})
    monkeypatch.setattr(reward, "DEMO_STAGES", {
        "clean": deep_merge(reward.DEMO_STAGES["clean"], {"train": tiny_train, "eval": {"every": 2}}),
        "step_aware": {"train": tiny_train, "eval": {"every": 2, "timesteps": [0, 500]}},
    })
    ctx = SimpleNamespace(config={"seed": 0, "teacher": None, "sampler": {"guidance": 3.0}}, run_dir=tmp_path,
                          device=torch.device("cpu"), artifacts={}, results={}, log=lambda _: None)
    reward.demo_stage(ctx)
    assert ctx.artifacts["step-aware"] == tmp_path / "reward" / "step_aware" / "scorer"
    table = ctx.results["reward"]
    assert table[["model", "timestep"]].values.tolist() == [["clean", "clean"], ["step_aware", 0], ["step_aware", 500]]
    assert table["accuracy"].between(0, 1).all() and table["label_noise_ceiling"].between(0.5, 1).all()
    config = yaml.safe_load((tmp_path / "reward" / "step_aware" / "config.yaml").read_text())
    assert config["model"]["init_from"] == str(tmp_path / "reward" / "clean" / "scorer")
    reward.demo_stage(ctx)  # a rerun resumes the finished runs instead of refusing their checkpoints

    # init_from maps a clean scorer into a time-conditioned one, which then equals it at every t.
    clean_dir = tmp_path / "reward" / "clean" / "scorer"
    step_aware = build_scorer("clip", "shapes-clip", time_conditioned=True)
    init_from(step_aware, clean_dir)
    images, prompts = torch.rand(3, 3, 32, 32), ["a red circle"] * 3
    with torch.no_grad():
        expected = load_scorer(clean_dir)(images, prompts)
        assert torch.allclose(step_aware(images, prompts, torch.tensor([0, 400, 999])), expected, atol=1e-6)
    assert not torch.allclose(expected, build_scorer("clip", "shapes-clip")(images, prompts).detach(), atol=1e-3)
    with pytest.raises(PrefalignError, match="is a clip scorer"):
        init_from(build_scorer("head", "shapes-clip"), clean_dir)


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path: Path, launch) -> None:
    config = tiny_config(tmp_path)
    # A clean model (no teacher to import in each worker keeps this test short); unweighted, so that the mean of
    # the per-process losses is the loss of the whole batch.
    common = ["--config", str(config), "loss.per_prompt_weighting=false", "model.time_conditioned=false",
              "step_aware.base_model=null"]
    single = cli(*common, "--out", str(tmp_path / "one"), "train.batch_size=4")
    assert single.code == 0, single.output
    launch(["-m", "prefalign.cli", "train-reward", *common, "--out", str(tmp_path / "two"), "train.batch_size=2"])
    # Equal up to float summation order, which Adam's first steps amplify: compare with the size of the update.
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = {f"backbone.model.{k}": v for k, v in load_shapes_clip().state_dict().items()}
    difference = sum(float((one[k] - two[k]).square().sum()) for k in one) ** 0.5
    update = sum(float((one[k] - start[k]).square().sum()) for k in start if k in one) ** 0.5
    assert update > 0.01 and difference < 0.01 * update
    e1, e2 = pd.read_csv(tmp_path / "one" / "eval.csv"), pd.read_csv(tmp_path / "two" / "eval.csv")
    assert e1["acc_clean"].tolist() == e2["acc_clean"].tolist()
    m1, m2 = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert m1["loss"].tolist() == pytest.approx(m2["loss"].tolist(), abs=1e-4)
