"""Ranked groups (k images per prompt) for Plackett–Luce reward training: the shapes-world maker, the group format
(parquet, jsonl, bad rows, padding), its pairwise expansion, and `train-reward loss.kind=plackett_luce`."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from PIL import Image
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.errors import PrefalignError
from prefalign.rewards import load
from prefalign.shapes.labels import make_preference_dataset, make_ranked_groups, simulate_ranking
from prefalign.train.preference_data import load_group_data, load_preference_data


def png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_simulated_rankings_are_plackett_luce_with_bradley_terry_pairs() -> None:
    scores, temperature, n = np.array([0.50, 0.56, 0.60, 0.45]), 0.05, 20000
    rng = np.random.default_rng(0)
    ranks = np.stack([simulate_ranking(scores, temperature, rng) for _ in range(n)])
    assert all(sorted(r) == [0, 1, 2, 3] for r in ranks[:50])
    utilities = np.exp(scores / temperature)
    first = np.bincount(ranks.argmin(1), minlength=4) / n
    assert np.abs(first - utilities / utilities.sum()).max() < 0.015  # P(i first) = e^{u_i} / Σ e^{u_j}
    for i, j in ((0, 1), (1, 2), (3, 2), (0, 3)):
        expected = 1 / (1 + math.exp(-(scores[i] - scores[j]) / temperature))
        assert abs(float((ranks[:, i] < ranks[:, j]).mean()) - expected) < 0.015


def test_make_ranked_groups_layout_determinism_and_oracle_order(tmp_path: Path) -> None:
    frame = pd.read_parquet(make_ranked_groups(tmp_path / "a", 6, 4, seed=2))
    assert set(frame.columns) == {"caption", "images", "ranks", "oracle", "model"}
    assert all(sorted(r) == [0, 1, 2, 3] and len(x) == 4 for r, x in zip(frame.ranks, frame.images, strict=True))
    meta = json.loads((tmp_path / "a" / "train.json").read_text())
    assert (meta["group_size"], meta["temperature"], meta["tie_margin"]) == (4, 0.05, 0.02)
    again = pd.read_parquet(make_ranked_groups(tmp_path / "b", 6, 4, seed=2))
    assert list(again.caption) == list(frame.caption)
    for column in ("images", "ranks", "oracle"):
        assert all(list(x) == list(y) for x, y in zip(again[column], frame[column], strict=True)), column
    # Another temperature keeps the images; a near-zero one ranks exactly by the oracle.
    cold = pd.read_parquet(make_ranked_groups(tmp_path / "c", 6, 4, seed=2, temperature=1e-6))
    assert all(list(x) == list(y) for x, y in zip(cold.images, frame.images, strict=True))
    for ranks, scores in zip(cold.ranks, cold.oracle, strict=True):
        best_first = np.asarray(scores)[np.argsort(ranks)]
        assert np.all(np.diff(best_first) <= 0)
    # At T = 0.05 the annotator is noisy: some rankings differ from the oracle's order.
    assert any(list(x) != list(y) for x, y in zip(cold.ranks, frame.ranks, strict=True))
    with pytest.raises(PrefalignError, match="group_size ≥ 2"):
        make_ranked_groups(tmp_path / "d", 2, 1, seed=0)
    with pytest.raises(PrefalignError, match="image_source"):
        make_ranked_groups(tmp_path / "d", 2, 2, seed=0, image_source="ideal")


def test_group_file_bad_rows_padding_and_pairwise_expansion(tmp_path: Path) -> None:
    rows = [
        {"caption": "p0", "images": [png(10), png(20), png(30)], "ranks": [2, 0, 1], "oracle": [0.1, 0.9, 0.5]},
        {"caption": "p1", "images": [png(40), png(50)], "ranks": [1, 0], "oracle": [0.2, 0.3]},  # padded to k = 3
        {"caption": None, "images": [png(1), png(2)], "ranks": [0, 1], "oracle": None},
        {"caption": "p2", "images": [png(1), png(2)], "ranks": [0, 0], "oracle": None},  # not a permutation
        {"caption": "p2", "images": [png(1)], "ranks": [0], "oracle": None},  # one image is no ranking
        {"caption": "p2", "images": [png(1), b"junk"], "ranks": [0, 1], "oracle": None},
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "groups.parquet")
    (tmp_path / "groups.json").write_text(json.dumps({"temperature": 0.05, "tie_margin": 0.02}))
    logs: list[str] = []
    data = load_group_data(str(tmp_path / "groups.parquet"), log=logs.append)
    assert data.skipped == {"missing caption": 1, "bad ranks": 2, "unreadable image": 1}
    assert "2 ranked groups of up to 3" in logs[0]
    assert data.images.shape == (2, 3, 3, 8, 8) and data.ranks.tolist() == [[2, 0, 1], [1, 0, -1]]
    batch = data.batch([1, 0])
    assert batch.candidates.shape == (2, 3, 3, 8, 8) and float(batch.candidates[0, 1].max()) == pytest.approx(50 / 255)
    assert batch.candidates[0, 2].abs().sum() == 0 and batch.ranks[0].tolist() == [1, 0, -1]

    row, a, b, columns = data.pairs()
    assert torch.stack([row, a, b], 1).tolist() == [[0, 0, 1], [0, 0, 2], [0, 1, 2], [1, 0, 1]]
    assert columns["label_0"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert columns["oracle_0"].tolist() == pytest.approx([0.1, 0.1, 0.9, 0.2])
    assert columns["true_label_0"].tolist() == [0.0, 0.0, 1.0, 0.0]
    rest, held = data.split_by_caption(0.5, seed=0)
    assert sorted(rest.captions + held.captions) == ["p0", "p1"] and len(held) == 1

    make_preference_dataset(tmp_path / "pairs", 3, seed=0)
    with pytest.raises(PrefalignError, match="ranked groups need the columns caption, images, ranks"):
        load_group_data(str(tmp_path / "pairs" / "train.parquet"), log=logs.append)


def test_jsonl_groups_with_paths_and_the_shapes_source(tmp_path: Path) -> None:
    for name, value, width in (("a", 0, 12), ("b", 100, 12), ("c", 200, 16)):
        Image.fromarray(np.full((12, width, 3), value, dtype=np.uint8)).save(tmp_path / f"{name}.png")
    line = {"caption": "a red circle", "images": ["a.png", "b.png", "c.png"], "ranks": [1, 0, 2]}  # the docstring's
    (tmp_path / "train.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(PrefalignError, match=r"\(12, 16\) pixels, not \(12, 12\).*data\.resolution"):
        load_group_data(str(tmp_path), log=lambda _: None)
    data = load_group_data(str(tmp_path), resolution=4, log=lambda _: None)
    assert data.images.shape == (1, 3, 3, 4, 4) and data.oracle is None and set(data.pairs()[3]) == {"label_0"}

    shapes = load_group_data("shapes:web?n=5&k=3&seed=4", log=lambda _: None)
    frame = pd.read_parquet(make_ranked_groups(tmp_path / "groups", 5, 3, seed=4))
    assert shapes.captions == list(frame.caption) and shapes.ranks.tolist() == [list(r) for r in frame.ranks]
    assert shapes.meta["group_size"] == 3 and shapes.oracle.shape == (5, 3)
    validation = load_group_data("shapes:web?n=5&k=3&seed=4", "validation", log=lambda _: None)
    assert validation.captions != shapes.captions
    with pytest.raises(PrefalignError, match="unknown keys: k"):
        load_preference_data("shapes:web?n=4&k=3")


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process (see tests/test_train_reward.py)."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_train_reward_on_ranked_groups_runs_and_writes_per_t_accuracy(tmp_path: Path) -> None:
    make_ranked_groups(tmp_path / "groups", 12, 3, seed=0)
    make_ranked_groups(tmp_path / "groups", 6, 3, seed=10_000, split="validation")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "device": "cpu", "data": {"source": str(tmp_path / "groups")}, "loss": {"kind": "plackett_luce"},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2},
        "eval": {"every": 2, "timesteps": [0, 900]},
    }))
    result = CliRunner().invoke(app, ["train-reward", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["step"].tolist() == [2]
    row = metrics.iloc[-1]
    assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
    for t in ("t0", "t900"):
        assert 0 <= row[f"acc_{t}"] <= 1 and 0 <= row[f"acc_true_{t}"] <= 1 and math.isfinite(row[f"val_loss_{t}"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.5 < summary["label_noise_ceiling"] < 1
    model = load("step-aware", checkpoint=tmp_path / "run" / "scorer")
    assert model.score(torch.rand(2, 3, 32, 32), ["a red circle"] * 2).shape == (2,)

    pairs = tmp_path / "pairs"
    make_preference_dataset(pairs, 4, seed=0)
    refused = CliRunner().invoke(app, ["train-reward", "--config", str(config), "--out", str(tmp_path / "bad"),
                                       f"data.source={pairs / 'train.parquet'}", "data.val_split=null"])
    assert refused.exit_code == 2 and "ranked groups need the columns caption, images, ranks" in refused.output
