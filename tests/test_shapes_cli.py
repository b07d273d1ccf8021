"""`prefalign shapes labels`: a Pick-a-Pic-format dataset on disk, with the resolved config beside it."""

import pandas as pd
from typer.testing import CliRunner

from prefalign.cli import app


def test_labels_command_writes_pick_a_pic_columns(tmp_path):
    result = CliRunner().invoke(app, ["shapes", "labels", "--out", str(tmp_path), "--seed", "3", "n_pairs=40"])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(tmp_path / "train.parquet")
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(frame.columns) and len(frame) == 40
    assert set(frame["label_0"].unique()) <= {0.0, 0.5, 1.0}
    assert (tmp_path / "config.yaml").read_text().startswith("seed: 3")


def test_labels_command_rejects_an_unknown_source(tmp_path):
    result = CliRunner().invoke(app, ["shapes", "labels", "--out", str(tmp_path), "source=nope"])
    assert result.exit_code == 2 and "image_source 'nope' is unknown" in result.output


def test_train_clip_needs_out():
    result = CliRunner().invoke(app, ["shapes", "train-clip", "--steps", "1"])
    assert result.exit_code == 2 and "--out" in result.output
