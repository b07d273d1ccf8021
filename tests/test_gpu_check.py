"""benchmarks/gpu_check.sh on a machine without CUDA: one clear line, exit 0, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the script would run the real check")
def test_without_cuda_it_skips_with_a_clear_message_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device visible; skipping the CUDA parts (reward throughput, trainer and bench smoke tests)"
    ]
    assert not list((tmp_path / "out").iterdir())
