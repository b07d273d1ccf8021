"""`prefalign demo` pieces that need no model: the verdict line against the teacher."""

import pandas as pd

from prefalign.demo import verdict_line


def test_verdict_line_reads_the_paired_difference_ci():
    teacher = [0.5, 0.6, 0.7, 0.4]
    offsets = {"A": [0.10, 0.12, 0.08, 0.11], "B": [0.05, -0.04, 0.03, -0.02], "C": [-0.2, -0.1, -0.15, -0.12]}
    rows = [("teacher", i, v) for i, v in enumerate(teacher)]
    rows += [(name, i, v + d) for name, ds in offsets.items() for i, (v, d) in enumerate(zip(teacher, ds, strict=True))]
    samples = pd.DataFrame(rows, columns=["generator", "prompt_index", "shapes-oracle"])
    board = pd.DataFrame({"generator": ["teacher", "A", "B", "C"], "win_shapes-oracle": [None, 1.0, 0.5, 0.0]})
    line = verdict_line(samples, board, ["A", "B", "C"], "shapes-oracle")
    assert line.startswith("[demo] shapes-oracle vs the teacher (mean difference paired by prompt, 95% CI)")
    assert "A +0.102 [" in line and "beats the teacher (wins 100%)" in line
    assert "B +0.005 [" in line and "above the teacher, CI spans 0 (wins 50%)" in line
    assert "C -0.143 [" in line and "below the teacher (wins 0%)" in line


def test_demo_loads_the_shipped_checkpoints_and_says_so(tmp_path):
    from typer.testing import CliRunner

    from prefalign.cli import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--device", "cpu", "num_prompts=2",
                                      "samples_per_prompt=1", "sampler.steps=2", "stages=[dpo,spo,dipp,leaderboard]"])
    assert result.exit_code == 0, result.output
    assert "rows DPO, SPO, DI++, Diff-Instruct load the full benchmark's checkpoints" in result.output
    for label in ("DPO", "SPO", "DI++", "Diff-Instruct"):
        assert f"[demo] {label}: the full benchmark's checkpoint (benchmarks/trainers_shapes.py arm" in result.output
    assert "[demo] shapes-oracle vs the teacher (mean difference paired by prompt, 95% CI): DPO " in result.output
    board = pd.read_csv(tmp_path / "leaderboard" / "leaderboard.csv").set_index("generator")
    assert board.loc["DI++", "nfe"] == 1 and board.loc["DPO", "nfe"] == 4  # 2 steps × CFG, like the teacher
    assert not (tmp_path / "dpo").exists()  # nothing trained


def test_shipped_checkpoints_with_another_teacher_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from prefalign.cli import app
    from prefalign.shapes.teacher import SHIPPED_TEACHER

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), f"teacher={SHIPPED_TEACHER}"])
    assert result.exit_code == 2 and "pass checkpoints=train" in result.output
    assert len(result.output.strip().splitlines()) == 1
