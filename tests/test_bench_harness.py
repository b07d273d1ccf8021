"""The bench pipeline end to end: reports, caching, resuming after a crash or SIGKILL, generate, the demo."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from prefalign.bench import generators as gen_module
from prefalign.bench.generators import BenchGenerator, register_generator
from prefalign.bench.harness import BENCH_DEFAULTS, image_seed, run_bench
from prefalign.cli import app
from prefalign.config import resolve_config
from prefalign.demo import DemoContext, stage_leaderboard
from prefalign.errors import PrefalignError
from prefalign.shapes.generators import ideal_renders
from prefalign.shapes.prompts import prompt_set
from prefalign.shapes.rewards import ShapesOracleReward
from prefalign.shapes.teacher import build_teacher, tiny_arch

runner = CliRunner()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random-weight shapes teacher (the real architecture, narrow widths)."""
    arch = tiny_arch()
    directory = tmp_path_factory.mktemp("teacher") / "teacher"
    build_teacher(arch).save_pretrained(directory)
    return directory


def _config(out, **changes):
    base = {
        "suite": "shapes-val",
        "generators": ["shapes-ideal", "shapes-web"],
        "rewards": ["shapes-oracle"],
        "num_prompts": 3,
        "samples_per_prompt": 2,
        "batch_size": 4,
        "device": "cpu",
        "out": str(out),
    }
    return resolve_config(BENCH_DEFAULTS, None, [], **{**base, **changes})


def _scores(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "samples.csv").drop(columns=["image"])


def test_cli_bench_writes_every_report(tmp_path, teacher_dir):
    out = tmp_path / "run"
    args = [
        "bench",
        "shapes-val",
        "-g",
        f"shapes-teacher:{teacher_dir}?steps=2&cfg=2.5&negative=blurry&name=teacher",
        "-g",
        "shapes-ideal",
        "-g",
        "shapes-web",
        "-r",
        "shapes-oracle",
        "-r",
        "shapes-clip",
        "--num-prompts",
        "3",
        "--samples-per-prompt",
        "2",
        "--batch-size",
        "4",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    board = pd.read_csv(out / "leaderboard.csv")
    assert board["generator"].tolist() == ["teacher", "shapes-ideal", "shapes-web"]
    assert board["nfe"].tolist()[0] == 4 and board["nfe"].isna().tolist()[1:] == [True, True]
    assert (
        (board["seconds_per_image"] > 0).all()
        and (board["images"] == 6).all()
        and (board["prompts"] == 3).all()
    )
    for reward in ("shapes-oracle", "shapes-clip"):
        assert (board[f"{reward}_ci_low"] <= board[reward]).all() and (
            board[reward] <= board[f"{reward}_ci_high"]
        ).all()
        wins = board[f"win_{reward}"]
        assert (
            pd.isna(wins[0]) and wins[1:].between(0, 1).all()
        )  # the baseline (first generator) has no win rate
    samples = pd.read_csv(out / "samples.csv")
    assert len(samples) == 18 and samples["seed"].tolist()[:2] == [
        image_seed(5, samples["prompt_id"][0], 0),
        image_seed(5, samples["prompt_id"][0], 1),
    ]
    assert all((out / p).is_file() for p in samples["image"])
    oracle = ShapesOracleReward().score(
        [str(out / p) for p in samples["image"][:4]], samples["prompt"][:4].tolist()
    )
    assert oracle.tolist() == pytest.approx(
        samples["shapes-oracle"][:4].tolist(), abs=1e-6
    )  # scores of the PNGs
    markdown = (out / "leaderboard.md").read_text()
    for text in (
        "steps=2",
        "cfg=2.5",
        "negative='blurry'",
        "sampler=ddim",
        "win vs teacher",
        "0.7 fidelity",
        "100 x max(cos, 0)",
        "95% bootstrap CI",
        "| teacher |",
    ):
        assert text in markdown
    gallery = (out / "gallery.html").read_text()
    assert gallery.count("<tr>") == 4 and gallery.count("<img") == 18
    assert gallery.count("<figcaption>") == 18 and "mean over all prompts" in gallery  # scores visible
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "run.json").read_text())["prompts"] == 3 and (out / "config.yaml").is_file()

    again = runner.invoke(app, args)  # everything cached: nothing generated or scored again
    assert again.exit_code == 0 and "0 of 6 images to generate" in again.output
    assert "shapes-oracle: 0 images to score" in again.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "leaderboard.csv"), board)


def test_new_reward_or_generator_reuses_the_cache_and_other_runs_are_refused(tmp_path):
    out = tmp_path / "run"
    first = run_bench(_config(out), log=lambda _: None)
    assert first.generated == {"shapes-ideal": 6, "shapes-web": 6} and first.scored == {"shapes-oracle": 12}
    more = run_bench(_config(out, rewards=["shapes-oracle", "0.5*shapes-oracle"]), log=lambda _: None)
    assert more.generated == {"shapes-ideal": 0, "shapes-web": 0}
    assert more.scored == {"shapes-oracle": 0, "0.5*shapes-oracle": 12}
    assert more.leaderboard["0.5*shapes-oracle"].tolist() == pytest.approx(
        (0.5 * more.leaderboard["shapes-oracle"]).tolist()
    )
    with pytest.raises(PrefalignError, match="pass a new --out"):
        run_bench(_config(out, seed=1), log=lambda _: None)
    with pytest.raises(PrefalignError, match="--baseline nope"):
        run_bench(_config(out, baseline="nope"), log=lambda _: None)
    with pytest.raises(PrefalignError, match="repeat"):
        run_bench(_config(out, generators=["shapes-ideal", "shapes-ideal"]), log=lambda _: None)


def test_a_crash_while_scoring_resumes_without_redoing_finished_batches(tmp_path, monkeypatch):
    clean = run_bench(_config(tmp_path / "clean"), log=lambda _: None)
    original = ShapesOracleReward.score
    calls = []

    def crash_on_third(self, images, prompts, batch_size=512):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(self, images, prompts, batch_size)

    monkeypatch.setattr(ShapesOracleReward, "score", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        run_bench(_config(tmp_path / "run"), log=lambda _: None)
    monkeypatch.setattr(ShapesOracleReward, "score", original)
    resumed = run_bench(_config(tmp_path / "run"), log=lambda _: None)
    assert resumed.generated == {"shapes-ideal": 0, "shapes-web": 0}
    assert resumed.scored == {"shapes-oracle": 12 - sum(calls[:2])}  # two finished batches were kept
    pd.testing.assert_frame_equal(_scores(tmp_path / "run"), _scores(tmp_path / "clean"))
    assert resumed.leaderboard["shapes-oracle"].tolist() == clean.leaderboard["shapes-oracle"].tolist()


def test_sigkill_mid_run_then_rerun_recomputes_nothing_done(tmp_path, monkeypatch):
    if torch.get_num_threads() > 1:
        pytest.skip("a forked child of a multi-threaded OpenMP process can hang; run with OMP_NUM_THREADS=1 (make test)")
    monkeypatch.setattr(gen_module, "_KINDS", dict(gen_module._KINDS))
    made, delay = [], [1.0]

    def slow(prompts, seeds):
        time.sleep(delay[0])
        made.extend(prompts)
        return ideal_renders(prompts, seeds)

    register_generator("slow", lambda t, o: BenchGenerator("slow", {"kind": "slow"}, None, lambda d: slow))
    out = tmp_path / "run"
    config = {
        **BENCH_DEFAULTS,
        "suite": "shapes-val",
        "generators": ["slow"],
        "rewards": ["shapes-oracle"],
        "num_prompts": 8,
        "batch_size": 2,
        "device": "cpu",
    }
    # A forked child (already imported) runs the bench; it is SIGKILLed once two batches are on disk.
    child = multiprocessing.get_context("fork").Process(
        target=run_bench, args=({**config, "out": str(out)},), kwargs={"log": lambda _: None}
    )
    child.start()
    deadline = time.monotonic() + 240
    while (
        len(list(out.glob("generators/*/chunks/*.json"))) < 2
        and child.is_alive()
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    records = list(out.glob("generators/*/chunks/*.json"))
    done = {
        p: p.stat().st_mtime_ns for p in out.glob("generators/*/images/*.png") if p.name in _recorded(records)
    }
    assert (
        child.exitcode == -signal.SIGKILL and 2 <= len(records) < 4 and not (out / "leaderboard.csv").exists()
    )

    delay[0] = 0.0
    resumed = run_bench({**config, "out": str(out)}, log=lambda _: None)
    assert len(made) == resumed.generated["slow"] == 8 - 2 * len(records)  # only the unfinished batches
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in done.items())  # finished images untouched
    run_bench({**config, "out": str(tmp_path / "clean")}, log=lambda _: None)
    pd.testing.assert_frame_equal(_scores(out), _scores(tmp_path / "clean"))


def _recorded(records: list[Path]) -> set[str]:
    return {f for r in records for f in json.loads(r.read_text())["files"]}


def test_generate_command_writes_images_that_score_reads(tmp_path):
    out = tmp_path / "gen"
    args = [
        "generate",
        "-g",
        "shapes-ideal",
        "--prompt",
        "one small red circle",
        "--prompt",
        "two large blue squares",
        "--samples-per-prompt",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    listing = pd.read_csv(out / "images.csv")
    assert listing["path"].tolist() == [
        "images/00000_0.png",
        "images/00000_1.png",
        "images/00001_0.png",
        "images/00001_1.png",
    ]
    assert json.loads((out / "generator.json").read_text())["settings"] == {"kind": "shapes-ideal"}
    scored = runner.invoke(
        app,
        [
            "score",
            "--images",
            str(out / "images.csv"),
            "-r",
            "shapes-oracle",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "scores.csv"),
        ],
    )
    assert scored.exit_code == 0, scored.output
    assert (pd.read_csv(tmp_path / "scores.csv")["score"] > 0.9).all()  # ideal renders satisfy the oracle
    other = runner.invoke(app, ["generate", "-g", "shapes-web", *args[3:]])
    assert other.exit_code == 2 and "another generator" in other.output


def test_demo_leaderboard_stage_benches_every_registered_generator(tmp_path, teacher_dir):
    config = {
        "seed": 0,
        "teacher": str(teacher_dir),
        "samples_per_prompt": 2,
        "rewards": ["shapes-oracle"],
        "sampler": {"steps": 2, "guidance": 3.0, "eta": 0.0},
    }
    ctx = DemoContext(config, tmp_path, torch.device("cpu"), list(prompt_set("val")[:2]), log=lambda _: None)

    def aligned(prompts, seeds):  # what a later stage registers: its trained model as an ImageSource
        return ideal_renders(prompts, seeds)

    aligned.nfe = 1
    ctx.generators["aligned"] = aligned
    stage_leaderboard(ctx)
    board = ctx.results["leaderboard"]
    assert board["generator"].tolist() == ["teacher", "ideal render", "web data", "aligned"]
    assert board["nfe"].tolist()[0] == 4 and board["nfe"].tolist()[3] == 1 and (board["images"] == 4).all()
    markdown = (tmp_path / "leaderboard" / "leaderboard.md").read_text()
    assert "| teacher |" in markdown and "win vs teacher" in markdown


def test_generate_reads_a_prompt_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one small red circle\ntwo large blue squares\n")
    out = tmp_path / "gen"
    result = runner.invoke(app, ["generate", "-g", "shapes-ideal", "--prompts", str(prompts), "--device", "cpu",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out / "images.csv")["prompt"].tolist() == prompts.read_text().split("\n")[:2]
    both = runner.invoke(app, ["generate", "-g", "shapes-ideal", "--prompts", str(prompts), "--suite", "shapes-val",
                               "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "either --prompts FILE or --suite" in both.output
