"""Bad inputs a new user hits when loading rewards or running `prefalign score`: each is one line that names
the file, the flag and the fix; `score` survives kills and odd files."""

from __future__ import annotations

import csv
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from prefalign import rewards
from prefalign.cli import app
from prefalign.errors import PrefalignError
from prefalign.rewards import checkpoints
from prefalign.rewards.checkpoints import refused_pickle_reason
from prefalign.rewards.images import ImageWarning
from prefalign.rewards.multi import RewardPass

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rewards"
CKPT = FIXTURES / "openclip_tiny.safetensors"
TINY = FIXTURES / "openclip_tiny.json"
runner = CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def _score_args(out: Path, *extra: str) -> list[str]:
    return ["score", "-r", "hpsv2.1", "-r", "clipscore", "--checkpoint", f"hpsv2.1={CKPT}",
            "--checkpoint", f"clipscore={CKPT}", "--option", f"hpsv2.1.model_config={TINY}",
            "--option", "clipscore.backend=open_clip", "--option", f"clipscore.model_config={TINY}",
            "--device", "cpu", "--batch-size", "2", "--out", str(out), *extra]  # fmt: skip


def test_directory_or_empty_file_as_checkpoint_is_one_line(tmp_path):
    with pytest.raises(PrefalignError, match=r"is a directory; pass the checkpoint file itself.*xswu/HPSv2"):
        rewards.load("hpsv2.1", checkpoint=tmp_path, model_config=TINY)
    with pytest.raises(PrefalignError, match=r"head .* is a directory.*--checkpoint aesthetic=PATH"):
        rewards.load("aesthetic", checkpoint=tmp_path, clip_checkpoint=CKPT)
    empty = tmp_path / "HPS_v2.1_compressed.pt"
    empty.touch()
    with pytest.raises(PrefalignError, match=r"is empty \(0 bytes"):
        rewards.load("hpsv2.1", checkpoint=empty, model_config=TINY)
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(FIXTURES / "images" / "img0.png", images)
    args = ["score", "-r", "hpsv2.1", "--checkpoint", f"hpsv2.1={empty}", "--images", str(images)]
    line = _one_line_error(runner.invoke(app, [*args, "--prompt", "x"]))
    assert "is empty" in line and "Aborted" not in line


def test_another_rewards_file_is_named_by_its_layout(tmp_path):
    hps_like = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": load_file(str(CKPT))}, hps_like)
    with pytest.raises(PrefalignError, match=r"open_clip CLIP checkpoint \(HPS"):
        rewards.load("imagereward", checkpoint=hps_like)
    with pytest.raises(PrefalignError, match=r"looks like a transformers CLIP model"):
        rewards.load("hpsv2.1", checkpoint=FIXTURES / "hf_clip_tiny" / "model.safetensors", model_config=TINY)


def test_missing_files_name_the_flag_the_cli_accepts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PrefalignError, match=r"--checkpoint hpsv2=PATH"):
        rewards.load("hpsv2", model_config=TINY)
    with pytest.raises(PrefalignError) as caught:
        rewards.load("aesthetic")
    assert "--checkpoint aesthetic=PATH" in str(caught.value) and "aesthetic.clip_checkpoint" in str(caught.value)
    assert "sac+logos+ava1-l14-linearMSE.pth" in str(caught.value) and "open_clip_model.safetensors" in str(caught.value)


def test_unreachable_hub_fails_fast_with_how_to_work_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    probes = []
    monkeypatch.setattr(checkpoints, "hub_reachable", lambda: probes.append(1) or False)
    start = time.perf_counter()
    with pytest.raises(PrefalignError, match=r"Hub is unreachable.*--checkpoint hpsv2.1=PATH.*HF_HUB_OFFLINE=1"):
        rewards.load("hpsv2.1", model_config=TINY)
    assert time.perf_counter() - start < 5 and probes


def test_refused_pickles_are_recognised_in_any_torch_wording():
    old = "Weights only load failed... Unsupported global: GLOBAL argparse.Namespace was not an allowed global"
    assert refused_pickle_reason(Exception(old)) == "an object of type argparse.Namespace"
    new = "weights_only load refused: class 'mypkg.models.Net' is not in the allowlist (see safe_globals)"
    assert refused_pickle_reason(Exception(new)) == "an object of type mypkg.models.Net"
    assert refused_pickle_reason(Exception("WeightsUnpickler error: Unsupported operand 0")) is None


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture
def four_images(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("img0.png", "img1.png", "img2.png", "img3.png"):
        shutil.copy(FIXTURES / "images" / name, d / name)
    return d


def test_score_resumes_after_a_kill_without_losing_or_repeating_rows(four_images, tmp_path):
    clean = tmp_path / "clean.csv"
    assert runner.invoke(app, [*_score_args(clean), "--images", str(four_images), "--prompt", "x"]).exit_code == 0
    full = clean.read_text()
    killed = tmp_path / "killed.csv"
    lines = full.splitlines(keepends=True)
    killed.write_text("".join(lines[:4]) + lines[4][:7])  # header, 3 rows, then half a row: killed mid-write
    shutil.copy(clean.with_name("clean.csv.settings.json"), tmp_path / "killed.csv.settings.json")
    result = runner.invoke(app, [*_score_args(killed), "--images", str(four_images), "--prompt", "x"])
    assert result.exit_code == 0, result.output
    assert "kept 3 from an earlier run" in result.output
    assert sorted(_rows(killed)) == sorted(_rows(clean)) and len(_rows(killed)) == 1 + 8
    again = runner.invoke(app, [*_score_args(killed), "--images", str(four_images), "--prompt", "x"])
    assert "wrote 0 scores" in again.output and killed.read_text().count("\n") == 9


def test_score_refuses_other_settings_and_unwritable_out_before_loading(four_images, tmp_path):
    out = tmp_path / "s.csv"
    assert runner.invoke(app, [*_score_args(out), "--images", str(four_images), "--prompt", "x"]).exit_code == 0
    other = [*_score_args(out), "--option", "clipscore.scale=2.5", "--images", str(four_images), "--prompt", "x"]
    assert "made with other checkpoints/options" in _one_line_error(runner.invoke(app, other))
    line = _one_line_error(runner.invoke(app, [*_score_args(tmp_path), "--images", str(four_images), "--prompt", "x"]))
    assert "is a directory" in line
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    line = _one_line_error(
        runner.invoke(app, [*_score_args(blocked / "s.csv"), "--images", str(four_images), "--prompt", "x"])
    )
    assert "cannot write there" in line
    foreign = tmp_path / "notes.csv"
    foreign.write_text("mine\n")
    line = _one_line_error(runner.invoke(app, [*_score_args(foreign), "--images", str(four_images), "--prompt", "x"]))
    assert "not a prefalign score CSV" in line and foreign.read_text() == "mine\n"


def test_animated_gif_is_scored_on_its_first_frame_with_one_warning_line(tmp_path):
    d = tmp_path / "gif"
    d.mkdir()
    first = Image.open(FIXTURES / "images" / "img0.png").convert("RGB")
    frames = [first, Image.fromarray(255 - np.asarray(first)), first]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    Image.open(d / "anim.gif").convert("RGB").save(tmp_path / "first.png")
    out = tmp_path / "g.csv"
    with warnings.catch_warnings(record=True) as caught:  # the CLI prints the note itself, once
        warnings.simplefilter("always")
        result = runner.invoke(app, [*_score_args(out), "--images", str(d), "--prompt", "x"])
    assert not [w for w in caught if "frames" in str(w.message)]
    assert result.exit_code == 0, result.output
    warning_lines = [line for line in result.stderr.splitlines() if "frames" in line]
    assert warning_lines == [f"warning: {d / 'anim.gif'}: 3 frames; scored on its first frame"]
    with pytest.warns(ImageWarning, match="3 frames; scored on its first frame"):  # the library warns
        list(RewardPass({"hps": rewards.load("hpsv2.1", CKPT, model_config=TINY)}, workers=0).run([d / "anim.gif"], ["x"]))
    hps = rewards.load("hpsv2.1", CKPT, model_config=TINY)
    row = next(r for r in _rows(out)[1:] if r[2] == "hpsv2.1")
    assert abs(float(row[3]) - float(hps.score([tmp_path / "first.png"], ["x"])[0])) < 1e-6
