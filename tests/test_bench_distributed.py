"""Two CPU processes (torchrun, gloo) shard the batches and merge to exactly the single-process result."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.shapes.teacher import build_teacher, tiny_arch


@pytest.mark.slow
def test_two_processes_give_the_single_process_leaderboard(tmp_path):
    arch = tiny_arch()
    build_teacher(arch).save_pretrained(tmp_path / "teacher")
    args = [
        "bench",
        "shapes-val",
        "-g",
        f"shapes-teacher:{tmp_path / 'teacher'}?steps=2&name=teacher",
        "-g",
        "shapes-ideal",
        "-r",
        "shapes-oracle",
        "--num-prompts",
        "5",
        "--samples-per-prompt",
        "2",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]
    # Same intra-op thread count as the in-process run below: float results may depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PREFALIGN_NO_PROGRESS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*launch, "-m", "prefalign.cli", *args, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output

    two, one = tmp_path / "two", tmp_path / "one"
    ranks = {json.loads(p.read_text())["rank"] for p in two.glob("generators/*/chunks/*.json")}
    assert ranks == {0, 1}  # both processes generated (and scored) their share
    pd.testing.assert_frame_equal(pd.read_csv(two / "samples.csv"), pd.read_csv(one / "samples.csv"))
    images = sorted(p.relative_to(one) for p in one.glob("generators/*/images/*.png"))
    assert len(images) == 20 and all((two / p).read_bytes() == (one / p).read_bytes() for p in images)
    boards = [pd.read_csv(d / "leaderboard.csv").drop(columns="seconds_per_image") for d in (two, one)]
    pd.testing.assert_frame_equal(*boards)
