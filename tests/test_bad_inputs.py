"""The bad-input corpus: each input a user can get wrong is one line on stderr, exit 2, no traceback, and nothing
already written is lost."""

import errno
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from prefalign.cli import app

RUNNER = CliRunner()


def _error_line(args: list[str]) -> str:
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_mixed_image_sizes_for_the_oracle(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "white").save(images / "a.png")
    Image.new("RGB", (64, 48), "white").save(images / "b.png")
    line = _error_line(["score", "-r", "shapes-oracle", "--images", str(images), "--prompt", "a red circle",
                        "--out", str(tmp_path / "scores.csv")])
    assert "mixed sizes (32x32, 64x48)" in line and "resize them all to 32x32" in line


def test_non_utf8_prompt_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\nun cercle rouge très grand\n".encode("latin-1"))
    line = _error_line(["generate", "-g", "shapes-ideal", "--prompts", str(prompts), "--out", str(tmp_path / "g")])
    assert f"{prompts} is not UTF-8 text (byte 0xe8" in line and "save it as UTF-8" in line


@pytest.mark.parametrize("damage", ["corrupt_weights", "wrong_keys", "corrupt_config"])
def test_broken_shapes_clip_checkpoint(tmp_path, damage):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"config": {"embed_dim": 32, "channels": [8, 16]}}))
    if damage == "corrupt_weights":
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    else:
        save_file({"some.other.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    if damage == "corrupt_config":
        (folder / "config.json").write_text("{not json")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    line = _error_line(["score", "-r", "shapes-clip", "--checkpoint", f"shapes-clip={folder}", "--images",
                        str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "s.csv")])
    assert str(folder) in line and "shapes train-clip" in line


def test_out_that_is_an_existing_file(tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me\n")
    line = _error_line(["shapes", "labels", "--out", str(existing), "n_pairs=2"])
    assert f"--out {existing} is an existing file; pass a directory" in line
    assert existing.read_text() == "keep me\n"


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("prefalign.config.atomic_write_text", full)
    line = _error_line(["shapes", "labels", "--out", str(tmp_path / "run"), "n_pairs=2"])
    assert "cannot use" in line and "config.yaml (No space left on device)" in line


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_out(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = _error_line(["shapes", "labels", "--out", str(locked / "run"), "n_pairs=2"])
    assert "cannot create --out" in line
