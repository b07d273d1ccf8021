"""A custom reward and a custom generator named on the command line as `package.module:function`."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from prefalign.cli import app

runner = CliRunner()

PLUGIN = '''
import torch
from prefalign.bench.generators import BenchGenerator
from prefalign.rewards.base import RewardInfo, RewardModel


class Brightness(RewardModel):
    info = RewardInfo("brightness", "1", True, None, "mean pixel value in [0, 1]")

    def score(self, images, prompts, batch_size=16):
        return torch.stack([torch.as_tensor(im).float().mean() for im in images])


def make_reward(checkpoint, device, dtype, **options):
    return Brightness()


def make_generator(target, options):
    value = float(options.get("value", 0.5))
    flat = lambda prompts, seeds: torch.full((len(prompts), 3, 8, 8), value)
    return BenchGenerator("flat", {"value": value}, None, lambda device: flat)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_plugin"
    sys.modules.pop("my_plugin", None)


def test_custom_reward_and_generator_by_module_path(plugin, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    out = tmp_path / "run"
    args = ["bench", f"file:{prompts}", "-g", f"{plugin}:make_generator?value=0.25&name=flat",
            "-r", f"{plugin}:make_reward", "-r", f"2*{plugin}:make_reward", "--device", "cpu", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    samples = pd.read_csv(out / "samples.csv")
    assert samples[f"{plugin}:make_reward"].tolist() == pytest.approx([64 / 255] * 2, abs=1e-6)
    assert samples[f"2*{plugin}:make_reward"].tolist() == pytest.approx([128 / 255] * 2, abs=1e-6)
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (4, 4), (255, 255, 255)).save(images / "white.png")
    scored = runner.invoke(app, ["score", "-r", f"{plugin}:make_reward", "--images", str(images), "--prompt", "x",
                                 "--out", str(tmp_path / "s.csv")])
    assert scored.exit_code == 0, scored.output
    assert float(pd.read_csv(tmp_path / "s.csv")["score"][0]) == pytest.approx(1.0)


def test_unimportable_plugin_is_one_line(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    result = runner.invoke(app, ["score", "-r", "no_such_module_xyz:f", "--images", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "no_such_module_xyz:f" in result.output and "unavailable" in result.output
