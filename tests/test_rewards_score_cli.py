"""`prefalign score` end to end on the tiny fixture models: CSV rows, bad input, one-line errors."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from prefalign import rewards
from prefalign.cli import app
from prefalign.rewards.clip_common import write_clip_processor_files

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rewards"
CKPT = FIXTURES / "openclip_tiny.safetensors"
TINY = FIXTURES / "openclip_tiny.json"
runner = CliRunner()


def _base_args(out: Path) -> list[str]:
    """clipscore on a tiny open_clip config saved locally, plus HPS v2.1 on the same weights."""
    return [
        "score",
        "--reward", "clipscore",
        "--reward", "hpsv2.1",
        "--checkpoint", f"clipscore={CKPT}",
        "--checkpoint", f"hpsv2.1={CKPT}",
        "--option", "clipscore.backend=open_clip",
        "--option", f"clipscore.model_config={TINY}",
        "--option", "clipscore.clip_at_zero=false",
        "--option", f"hpsv2.1.model_config={TINY}",
        "--device", "cpu",
        "--batch-size", "2",
        "--out", str(out),
    ]  # fmt: skip


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Fixture images plus awkward ones: RGBA, grayscale, 16-bit, CMYK JPEG and a corrupt file."""
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("img0.png", "img4.png"):
        shutil.copy(FIXTURES / "images" / name, d / name)
    rgb = np.asarray(Image.open(FIXTURES / "images" / "img1.png"))
    Image.fromarray(np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 128, np.uint8)], -1)).save(
        d / "rgba.png"
    )
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(d / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "print.jpg")
    (d / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return d


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.filterwarnings("ignore:.*truncated to 77")  # the library re-check below re-warns; asserted above
def test_scores_directory_skips_corrupt_and_exits_1(image_dir, tmp_path):
    names = sorted(p.name for p in image_dir.iterdir())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a cat", "", "a dog " * 40, "snow", "sea", "sky", "x"]) + "\n")
    out = tmp_path / "scores.csv"
    with pytest.warns(UserWarning) as caught:
        result = runner.invoke(app, [*_base_args(out), "--images", str(image_dir), "--prompts", str(prompts)])
    assert result.exit_code == 1, result.output
    assert "skipped" in result.stderr and "zz_corrupt.png" in result.stderr
    messages = " | ".join(str(w.message) for w in caught)
    assert "empty prompt" in messages and "truncated to 77 as the official tokenizer does" in messages
    rows = _rows(out)
    assert [list(r) for r in rows[:1]] == [["path", "prompt", "reward", "score"]]
    assert len(rows) == 2 * (len(names) - 1)  # every readable image, once per reward
    assert {Path(r["path"]).name for r in rows} == set(names) - {"zz_corrupt.png"}
    assert {r["reward"] for r in rows} == {"clipscore", "hpsv2.1"}
    # Rows match the library on the same file/prompt.
    hps = rewards.load("hpsv2.1", CKPT, model_config=TINY)
    row = next(r for r in rows if r["reward"] == "hpsv2.1" and r["path"].endswith("img0.png"))
    expected = hps.score([row["path"]], [row["prompt"]])[0]
    assert abs(float(row["score"]) - float(expected)) < 1e-6


def test_csv_input_with_prompt_column_and_weighted_sum(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text(f"path,prompt\n{FIXTURES / 'images' / 'img0.png'},a red disc\nimg2.png,waves\n")
    shutil.copy(FIXTURES / "images" / "img2.png", tmp_path / "img2.png")  # relative to the CSV's folder
    processor = write_clip_processor_files(tmp_path / "proc")
    out = tmp_path / "s.csv"
    args = [
        "score", "--reward", "pickscore+0.5*hpsv2.1", "--images", str(listing), "--out", str(out),
        "--checkpoint", f"pickscore={FIXTURES / 'hf_clip_tiny'}", "--checkpoint", f"hpsv2.1={CKPT}",
        "--option", f"pickscore.processor={processor}", "--option", f"hpsv2.1.model_config={TINY}",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert [r["prompt"] for r in rows] == ["a red disc", "waves"] and rows[0][
        "reward"
    ] == "pickscore+0.5*hpsv2.1"
    pick = rewards.load("pickscore", FIXTURES / "hf_clip_tiny", processor=processor)
    hps = rewards.load("hpsv2.1", CKPT, model_config=TINY)
    paths, texts = [r["path"] for r in rows], [r["prompt"] for r in rows]
    expected = pick.score(paths, texts) + 0.5 * hps.score(paths, texts)
    assert torch.allclose(torch.tensor([float(r["score"]) for r in rows]), expected, atol=1e-5)


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_count_mismatch_missing_checkpoint_and_unknown_reward(image_dir, tmp_path):
    out = tmp_path / "scores.csv"
    out.write_text("previous\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    line = _one_line_error(
        runner.invoke(app, [*_base_args(out), "--images", str(image_dir), "--prompts", str(prompts)])
    )
    assert "has 2 lines but there are 7 images" in line
    args = ["score", "-r", "hpsv2.1", "--checkpoint", f"hpsv2.1={tmp_path / 'gone.pt'}"]
    line = _one_line_error(runner.invoke(app, [*args, "--images", str(image_dir), "--prompt", "x"]))
    assert "gone.pt: no such file" in line
    line = _one_line_error(
        runner.invoke(app, ["score", "-r", "hpsv9", "--images", str(image_dir), "--prompt", "x"])
    )
    assert "unknown reward 'hpsv9'; known rewards:" in line
    line = _one_line_error(runner.invoke(app, ["score", "reward=hpsv2.1", "--images", str(image_dir)]))
    assert "config key 'reward' is not a setting of score; did you mean 'rewards'?" in line
    assert out.read_text() == "previous\n"  # nothing written on error


def test_glob_with_single_prompt(tmp_path):
    out = tmp_path / "g.csv"
    pattern = str(FIXTURES / "images" / "img[0-2].png")
    result = runner.invoke(app, [*_base_args(out), "--images", pattern, "--prompt", "a photo"])
    assert result.exit_code == 0, result.output
    rows = _rows(out)  # one pass: each image's rows follow each other, images in path order
    assert [Path(r["path"]).name for r in rows if r["reward"] == "clipscore"] == ["img0.png", "img1.png", "img2.png"]
    assert [r["reward"] for r in rows[:2]] == ["clipscore", "hpsv2.1"]
