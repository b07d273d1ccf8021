"""Run directories stay true: one writer at a time (a killed holder never blocks), orphan temporary files removed,
a refused re-run leaves config.yaml alone, a bench continues only with its batch size, and a killed training run
resumes to the same metrics.csv / eval.csv (no duplicated step-0 row, running sums checkpointed) and weights."""

import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from typer.testing import CliRunner

from prefalign.bench.harness import BENCH_DEFAULTS, run_bench
from prefalign.cli import app
from prefalign.config import deep_merge, resolve_config
from prefalign.diffusion.tiny import save_tiny_pipeline
from prefalign.errors import PrefalignError
from prefalign.runs import prepare_run_dir
from prefalign.shapes.labels import make_preference_dataset
from prefalign.train import dpo, reward
from prefalign.train.common import MetricsLog

RUNNER = CliRunner()
HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from prefalign.runs import lock_run_dir
    lock_run_dir(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(60)
""")


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_second_writer_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = RUNNER.invoke(app, ["shapes", "labels", "--out", str(out), "n_pairs=2"])
        assert result.exit_code == 2
        assert f"another prefalign process (pid {holder.pid}) is writing to {out}" in result.output
        assert not (out / "config.yaml").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").exists()  # the stale lock file stays, and does not block
    result = RUNNER.invoke(app, ["shapes", "labels", "--out", str(out), "n_pairs=2", "val_pairs=2"])
    assert result.exit_code == 0, result.output


def test_orphan_temporary_files_are_removed(tmp_path):
    orphans = [tmp_path / ".metrics.csv.abc123.tmp", tmp_path / "generators" / "x" / ".img.png.def456.tmp"]
    for path in orphans:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    keep = tmp_path / "notes.tmp"
    keep.write_text("mine")
    prepare_run_dir({"out": str(tmp_path)})
    assert not any(p.exists() for p in orphans) and keep.exists()


def test_refused_rerun_keeps_the_finished_runs_config(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"finished run")
    (tmp_path / "config.yaml").write_text("train: {lr: 0.5}\n")
    result = RUNNER.invoke(app, ["align", "train.lr=1e-3", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "pass --resume" in result.output
    assert (tmp_path / "config.yaml").read_text() == "train: {lr: 0.5}\n"


def test_bench_refuses_another_batch_size_on_resume(tmp_path):
    def config(batch_size):
        return resolve_config(BENCH_DEFAULTS, None, [], suite="shapes-val", generators=["shapes-ideal"],
                              rewards=["shapes-oracle"], num_prompts=2, batch_size=batch_size, device="cpu",
                              out=str(tmp_path))

    run_bench(config(2), log=lambda _: None)
    with pytest.raises(PrefalignError, match=r"generated with batch_size 2 .* continue it with --batch-size 2"):
        run_bench(config(1), log=lambda _: None)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["batch_size"] == 2


def test_metrics_log_drops_everything_when_no_checkpoint_was_written(tmp_path):
    log = MetricsLog(tmp_path / "eval.csv")
    log.append({"step": 0, "oracle": 0.5})
    again = MetricsLog(tmp_path / "eval.csv")
    again.truncate(0)
    assert again.rows == []


def same_csv(a, b, file: str) -> None:
    """The two runs' CSVs agree in every column but wall-clock time."""
    left, right = (pd.read_csv(d / file) for d in (a, b))
    timing = [c for c in left.columns if c.startswith("seconds")]
    pd.testing.assert_frame_equal(left.drop(columns=timing), right.drop(columns=timing))


@pytest.mark.usefixtures("single_thread")
def test_dpo_killed_before_and_after_its_first_checkpoint_resumes_to_the_same_files(tmp_path, kill_on_calls):
    pairs = make_preference_dataset(tmp_path / "pairs", 16, seed=3).path
    model = save_tiny_pipeline(tmp_path / "pipe", "pixel")
    overrides = [f"model={model}", f"data.source={pairs}", "train.steps=4", "train.batch_size=2", "train.lr=1e-3",
                 "train.log_every=2", "train.checkpoint_every=3", "eval.every=2", "eval.num_prompts=2",
                 "eval.steps=2", "eval.rewards=[shapes-oracle]"]

    def run(out, resume=False):
        config = resolve_config(dpo.DEFAULTS, None, overrides, out=str(out), device="cpu", resume=resume)
        dpo.train(config, prepare_run_dir(config), log=lambda _: None)

    run(tmp_path / "straight")
    # Killed at step 2 (no checkpoint yet), then at step 4 (checkpoint at 3, one loss not yet logged).
    kill_on_calls(dpo, "dpo_step", {2, 6})
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "killed", resume=True)
    run(tmp_path / "killed", resume=True)
    assert [r["step"] for r in MetricsLog(tmp_path / "killed" / "eval.csv").rows] == [0, 2, 4]
    for file in ("metrics.csv", "eval.csv"):
        same_csv(tmp_path / "straight", tmp_path / "killed", file)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "killed"))
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])


@pytest.mark.usefixtures("single_thread")
def test_train_reward_killed_between_evaluations_resumes_to_the_same_metrics(tmp_path, kill_on_calls):
    tiny = {"device": "cpu", "data": {"source": "shapes:web?n=24&seed=0", "val_limit": 12},
            "step_aware": {"base_model": None}, "model": {"time_conditioned": False},
            "train": {"steps": 4, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 3}, "eval": {"every": 2}}

    def run(out, resume=False):
        config = deep_merge(reward.DEFAULTS, {**tiny, "out": str(out), "resume": resume})
        reward.train(config, prepare_run_dir(config), log=lambda _: None)

    run(tmp_path / "straight")
    kill_on_calls(reward, "_pair_scores", {4})
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    run(tmp_path / "killed", resume=True)
    same_csv(tmp_path / "straight", tmp_path / "killed", "metrics.csv")

