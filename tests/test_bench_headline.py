"""The headline job end to end: `prefalign bench coco-val` on the official COCO captions, a tiny SD pipeline
and every real reward adapter (ImageReward, HPS v2.1, PickScore, CLIPScore, aesthetic) on its tiny fixture
config. Skipped when ../shared (the captions file) is absent."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from prefalign import rewards
from prefalign.cli import app
from prefalign.diffusion.tiny import save_tiny_pipeline
from prefalign.rewards.clip_common import write_clip_processor_files

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = REPO.parent / "shared" / "data" / "coco" / "captions_val2017.json"
REWARDS = REPO / "tests" / "fixtures" / "rewards"
IR_FIXTURES = REPO / "tests" / "fixtures" / "imagereward"
NAMES = ("imagereward", "hpsv2.1", "pickscore", "clipscore", "aesthetic")
pytestmark = [
    pytest.mark.skipif(not CAPTIONS.is_file(), reason=f"{CAPTIONS} absent (../shared not mounted)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # long COCO captions are truncated, as officially
]
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("headline")
    spec = importlib.util.spec_from_file_location("irgen", REPO / "benchmarks" / "imagereward_parity_fixtures.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected = json.loads((IR_FIXTURES / "expected.json").read_text())
    torch.save(generator.recipe_state_dict(expected["tiny"]["official_shapes"]), root / "ImageReward.pt")
    (root / "ir_arch.json").write_text(json.dumps(expected["tiny"]["arch"]))
    return {
        "root": root,
        "pipe": save_tiny_pipeline(root / "tiny-sd", "sd", sample_size=16),
        "processor": write_clip_processor_files(root / "clip_processor"),
    }


def _args(setup: dict, out: Path, imagereward: Path | None = None) -> list[str]:
    root, proc = setup["root"], setup["processor"]
    return [
        "bench", "coco-val", "--captions", str(CAPTIONS), "--num-prompts", "3", "--batch-size", "2",
        "-g", f"diffusers:{setup['pipe']}?steps=2&name=tiny-sd", *[a for n in NAMES for a in ("-r", n)],
        "--checkpoint", f"imagereward={imagereward or root / 'ImageReward.pt'}",
        "--option", f"imagereward.arch={root / 'ir_arch.json'}",
        "--checkpoint", f"hpsv2.1={REWARDS / 'openclip_tiny.safetensors'}",
        "--option", f"hpsv2.1.model_config={REWARDS / 'openclip_tiny.json'}",
        "--checkpoint", f"pickscore={REWARDS / 'hf_clip_tiny'}", "--option", f"pickscore.processor={proc}",
        "--checkpoint", f"clipscore={REWARDS / 'hf_clip_tiny'}", "--option", f"clipscore.processor={proc}",
        "--checkpoint", f"aesthetic={REWARDS / 'aesthetic_head.safetensors'}",
        "--option", f"aesthetic.clip_checkpoint={REWARDS / 'aesthetic_visual.safetensors'}",
        "--option", f"aesthetic.model_config={REWARDS / 'aesthetic_tiny.json'}",
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def test_coco_val_leaderboard_with_every_real_reward(setup, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, _args(setup, out))
    assert result.exit_code == 0, result.output
    board = pd.read_csv(out / "leaderboard.csv")
    assert all(any(col.startswith(name) for col in board.columns) for name in NAMES), list(board.columns)
    samples = pd.read_csv(out / "samples.csv")
    assert len(samples) == 3 and all(math.isfinite(v) for n in NAMES for v in samples[n])
    # The shared pass gives what each reward gives alone on the same files.
    paths, prompts = [str(out / p) for p in samples["image"]], list(samples["prompt"])
    pick = rewards.load("pickscore", REWARDS / "hf_clip_tiny", processor=setup["processor"])
    hps = rewards.load("hpsv2.1", REWARDS / "openclip_tiny.safetensors", model_config=REWARDS / "openclip_tiny.json")
    for name, model in (("pickscore", pick), ("hpsv2.1", hps)):
        assert torch.allclose(model.score(paths, prompts), torch.tensor(samples[name].tolist()), atol=1e-5)


def test_a_bad_reward_checkpoint_fails_before_anything_is_generated(setup, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, _args(setup, out, imagereward=tmp_path))  # a directory, not ImageReward.pt
    assert result.exit_code == 2, result.output
    assert "is a directory" in result.output
    assert not list(out.glob("generators/*/images/*.png"))
