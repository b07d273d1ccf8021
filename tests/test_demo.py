"""`prefalign demo` pieces that need no model: the verdict line against the teacher."""

import pandas as pd

from prefalign.demo import verdict_line


def test_verdict_line_reads_the_paired_win_rate_ci():
    board = pd.DataFrame({
        "generator": ["teacher", "A", "B", "C"],
        "win_shapes-oracle": [None, 0.7, 0.5, 0.1],
        "win_shapes-oracle_ci_low": [None, 0.55, 0.3, 0.0],
        "win_shapes-oracle_ci_high": [None, 0.85, 0.7, 0.2],
    })
    line = verdict_line(board, ["A", "B", "C"], "shapes-oracle")
    assert line.startswith("[demo] shapes-oracle win rate vs the teacher")
    assert "A 70% [55%, 85%] beats the teacher" in line
    assert "B 50% [30%, 70%] tie (CI spans 50%)" in line
    assert "C 10% [0%, 20%] below the teacher" in line
