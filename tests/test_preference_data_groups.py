"""Ranked groups (k images per prompt) for Plackett–Luce reward training: the shapes-world maker, the group format
(jsonl with image files, parquet, ties, padding), its strict one-line validation, its pairwise expansion, the
round trip `shapes labels group_size=K` → `train-reward loss.kind=plackett_luce`, and Plackett–Luce on pairs."""

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
from prefalign.train.preference_data import load_preference_data
from prefalign.train.preference_groups import load_group_data
from prefalign.train.preference_losses import PlackettLuceLoss


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


def read_groups(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_ranked_groups_layout_determinism_and_oracle_order(tmp_path: Path) -> None:
    path = make_ranked_groups(tmp_path / "a", 6, 4, seed=2)
    assert path == tmp_path / "a" / "train.jsonl"
    groups = read_groups(path)
    assert len(groups) == 6 and all(set(g) == {"caption", "images", "oracle"} and len(g["images"]) == 4
                                    for g in groups)
    meta = json.loads((tmp_path / "a" / "train.json").read_text())
    assert (meta["group_size"], meta["temperature"], meta["tie_margin"]) == (4, 0.05, 0.02)

    def pixels(folder: Path, group: dict) -> list[bytes]:
        return [(folder / name).read_bytes() for name in group["images"]]

    again = read_groups(make_ranked_groups(tmp_path / "b", 6, 4, seed=2))
    assert again == groups and all(pixels(tmp_path / "a", g) == pixels(tmp_path / "b", g) for g in groups)
    # Another temperature keeps the images (in another order); a near-zero one ranks exactly by the oracle.
    cold = read_groups(make_ranked_groups(tmp_path / "c", 6, 4, seed=2, temperature=1e-6))
    for warm_group, cold_group in zip(groups, cold, strict=True):
        assert sorted(pixels(tmp_path / "a", warm_group)) == sorted(pixels(tmp_path / "c", cold_group))
        assert np.all(np.diff(cold_group["oracle"]) <= 0)
    # At T = 0.05 the annotator is noisy: some rankings differ from the oracle's order.
    assert any(np.any(np.diff(g["oracle"]) > 0) for g in groups)
    with pytest.raises(PrefalignError, match="group_size ≥ 2"):
        make_ranked_groups(tmp_path / "d", 2, 1, seed=0)
    with pytest.raises(PrefalignError, match="image_source"):
        make_ranked_groups(tmp_path / "d", 2, 2, seed=0, image_source="ideal")


def test_group_file_ties_padding_and_pairwise_expansion(tmp_path: Path) -> None:
    rows = [
        {"caption": "p0", "images": [png(10), png(20), png(30)], "ranks": [2, 0, 1], "oracle": [0.1, 0.9, 0.5]},
        {"caption": "p1", "images": [png(40), png(50)], "ranks": [1, 0], "oracle": [0.2, 0.3]},  # padded to k = 3
        {"caption": "p2", "images": [png(60), png(70), png(80)], "ranks": [0, 1, 1], "oracle": [0.9, 0.4, 0.4]},
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "groups.parquet")
    (tmp_path / "groups.json").write_text(json.dumps({"temperature": 0.05, "tie_margin": 0.02}))
    logs: list[str] = []
    data = load_group_data(str(tmp_path / "groups.parquet"), log=logs.append)
    assert logs == [f"[data] {tmp_path / 'groups.parquet'} (train): 3 ranked groups of up to 3 images"]
    assert data.images.shape == (3, 3, 3, 8, 8) and data.ranks.tolist() == [[2, 0, 1], [1, 0, -1], [0, 1, 1]]
    batch = data.batch([1, 0])
    assert batch.candidates.shape == (2, 3, 3, 8, 8) and float(batch.candidates[0, 1].max()) == pytest.approx(50 / 255)
    assert batch.candidates[0, 2].abs().sum() == 0 and batch.ranks[0].tolist() == [1, 0, -1]

    row, a, b, columns = data.pairs()
    assert torch.stack([row, a, b], 1).tolist() == [[0, 0, 1], [0, 0, 2], [0, 1, 2], [1, 0, 1],
                                                    [2, 0, 1], [2, 0, 2], [2, 1, 2]]
    assert columns["label_0"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5]  # the tie is 0.5
    assert columns["oracle_0"].tolist() == pytest.approx([0.1, 0.1, 0.9, 0.2, 0.9, 0.9, 0.4])
    assert columns["true_label_0"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5]
    rest, held = data.split_by_caption(0.4, seed=0)
    assert sorted(rest.captions + held.captions) == ["p0", "p1", "p2"] and len(held) == 1


BAD_GROUPS = [  # (line, the field the one-line error names)
    ("{not json", "not a JSON object"),
    (json.dumps({"images": ["a.png", "b.png"]}), 'field "caption"'),
    (json.dumps({"prompt": "x", "images": ["a.png", "b.png"]}), 'field "caption"'),
    (json.dumps({"caption": "x", "images": ["a.png"]}), 'field "images" must be a list of at least 2'),
    (json.dumps({"caption": "x", "images": ["a.png", "b.png"], "ranks": [0]}), 'field "ranks"'),
    (json.dumps({"caption": "x", "images": ["a.png", "b.png"], "ranks": [0, -1]}), 'field "ranks"'),
    (json.dumps({"caption": "x", "images": ["a.png", "b.png"], "ranks": [0, 0.5]}), 'field "ranks"'),
    (json.dumps({"caption": "x", "images": ["a.png", "b.png"], "oracle": [1, "?"]}), 'field "oracle"'),
    (json.dumps({"caption": "x", "images": ["a.png", "gone.png"]}), 'field "images" item 1 gone.png: no such file'),
    (json.dumps({"caption": "x", "images": ["a.png", "junk.png"]}), 'field "images" item 1 junk.png: not a readable'),
]


def test_bad_group_files_stop_with_one_line_naming_file_line_and_field(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    good = json.dumps({"caption": "fine", "images": ["a.png", "a.png"]})
    config = tmp_path / "groups.yaml"
    config.write_text(yaml.safe_dump({"device": "cpu", "loss": {"kind": "plackett_luce"},
                                      "model": {"time_conditioned": False}, "step_aware": {"base_model": None}}))
    for n, (line, field) in enumerate(BAD_GROUPS):
        (tmp_path / "train.jsonl").write_text(f"{good}\n\n{line}\n")
        result = CliRunner().invoke(app, ["train-reward", "--config", str(config), "--out", str(tmp_path / f"r{n}"),
                                          f"data.source={tmp_path}"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {tmp_path / 'train.jsonl'} line 3: ") and field in lines[0], lines[0]
        assert '"caption": PROMPT, "images": [BEST, ..., WORST]' in lines[0]  # the fix: the format
    missing = CliRunner().invoke(app, ["train-reward", "--config", str(config), "--out", str(tmp_path / "m"),
                                       f"data.source={tmp_path}", "data.split=test"])
    assert missing.exit_code == 2 and "has no split 'test': looked for test.parquet, test.jsonl" in missing.output
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(PrefalignError, match="has no ranked groups; write one JSON object per line"):
        load_group_data(str(tmp_path), log=lambda _: None)


def test_jsonl_groups_with_paths_and_the_shapes_source(tmp_path: Path) -> None:
    for name, value, width in (("a", 0, 12), ("b", 100, 12), ("c", 200, 16)):
        Image.fromarray(np.full((12, width, 3), value, dtype=np.uint8)).save(tmp_path / f"{name}.png")
    line = {"caption": "a red circle", "images": ["a.png", "b.png", "c.png"], "ranks": [1, 0, 2]}  # the README's
    (tmp_path / "train.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(PrefalignError, match=r"train\.jsonl line 1: images of \(12, 16\) pixels, not \(12, 12\)"):
        load_group_data(str(tmp_path), log=lambda _: None)
    data = load_group_data(str(tmp_path), resolution=4, log=lambda _: None)
    assert data.images.shape == (1, 3, 3, 4, 4) and data.oracle is None and set(data.pairs()[3]) == {"label_0"}
    assert data.ranks.tolist() == [[1, 0, 2]]
    (tmp_path / "train.jsonl").write_text(json.dumps({**line, "ranks": None}) + "\n")  # no ranks: listed order
    assert load_group_data(str(tmp_path), resolution=4, log=lambda _: None).ranks.tolist() == [[0, 1, 2]]

    shapes = load_group_data("shapes:web?n=5&k=3&seed=4", log=lambda _: None)
    written = read_groups(make_ranked_groups(tmp_path / "groups", 5, 3, seed=4))
    assert shapes.captions == [g["caption"] for g in written] and shapes.ranks.tolist() == [[0, 1, 2]] * 5
    assert torch.allclose(shapes.oracle, torch.tensor([g["oracle"] for g in written]))
    assert shapes.meta["group_size"] == 3 and shapes.oracle.shape == (5, 3)
    validation = load_group_data("shapes:web?n=5&k=3&seed=4", "validation", log=lambda _: None)
    assert validation.captions != shapes.captions
    with pytest.raises(PrefalignError, match="unknown keys: k"):
        load_preference_data("shapes:web?n=4&k=3")


def test_plackett_luce_of_two_is_bradley_terry_in_closed_form() -> None:
    s_w, s_l, temperature = 0.7, -0.4, 0.5
    delta = (s_w - s_l) / temperature
    scores = torch.tensor([[s_l, s_w], [s_w, s_l]])
    ranks = torch.tensor([[1, 0], [0, 1]])  # the winner second, then first: the same pair
    loss = PlackettLuceLoss(temperature)(scores, ranks)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-delta)), rel=1e-6)  # −log σ(Δ)
    assert float(PlackettLuceLoss(temperature, top_k=1)(scores, ranks)) == pytest.approx(float(loss))
    # A tie of two (Breslow): −log σ(Δ) − log σ(−Δ), smallest at equal scores, where it is 2 log 2.
    tie = PlackettLuceLoss(temperature)(scores[:1], torch.tensor([[0, 0]]))
    assert float(tie) == pytest.approx(math.log1p(math.exp(-delta)) + math.log1p(math.exp(delta)), rel=1e-6)
    equal = PlackettLuceLoss()(torch.zeros(1, 2), torch.tensor([[3, 3]]))
    assert float(equal) == pytest.approx(2 * math.log(2))
    pulled = torch.tensor([[1.0, -1.0]], requires_grad=True)
    PlackettLuceLoss()(pulled, torch.tensor([[0, 0]])).backward()
    assert pulled.grad[0, 0] > 0 > pulled.grad[0, 1]  # descent moves the tied scores together
    # Ties inside a longer ranking: the tied pair shares the normaliser of its first place.
    a, b, c = 1.0, 0.2, -0.3
    three = PlackettLuceLoss()(torch.tensor([[a, b, c]]), torch.tensor([[0, 1, 1]]))
    expected = -(a - math.log(math.exp(a) + math.exp(b) + math.exp(c))) - (b + c - 2 * math.log(math.exp(b) + math.exp(c)))
    assert float(three) == pytest.approx(expected, rel=1e-6)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process (see tests/test_train_reward.py)."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_shapes_labels_groups_round_trip_into_plackett_luce_training(tmp_path: Path) -> None:
    """`shapes labels group_size=3` writes the group format; `train-reward` reads it and trains two PL steps."""
    labels = tmp_path / "groups"
    made = CliRunner().invoke(app, ["shapes", "labels", "--out", str(labels), "n_pairs=12", "val_pairs=6",
                                    "group_size=3"])
    assert made.exit_code == 0, made.output
    assert "train: 12 ranked groups of 3 images written to" in made.output
    assert {p.name for p in labels.iterdir()} >= {"train.jsonl", "validation.jsonl", "train.json", "images"}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "device": "cpu", "data": {"source": str(labels)}, "loss": {"kind": "plackett_luce"},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2, "log_every": 1},
        "eval": {"every": 2, "timesteps": [0, 900]},
    }))
    result = CliRunner().invoke(app, ["train-reward", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["step"].tolist() == [1, 2] and (metrics["loss"] > 0).all() and metrics["loss"].notna().all()
    assert metrics["fb_calls"].tolist() == [4 * 3, 2 * 4 * 3]  # steps × groups × images
    row = pd.read_csv(tmp_path / "run" / "eval.csv").iloc[-1]
    assert row["step"] == 2
    for t in ("t0", "t900"):
        assert 0 <= row[f"acc_{t}"] <= 1 and 0 <= row[f"acc_true_{t}"] <= 1 and math.isfinite(row[f"val_loss_{t}"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.5 < summary["label_noise_ceiling"] < 1 and summary["train_pairs"] == 12 and summary["steps_run"] == 2
    model = load("step-aware", checkpoint=tmp_path / "run" / "scorer")
    assert model.score(torch.rand(2, 3, 32, 32), ["a red circle"] * 2).shape == (2,)

    pairs = tmp_path / "pairs"
    make_preference_dataset(pairs, 4, seed=0)
    refused = CliRunner().invoke(app, ["train-reward", "--config", str(config), "--out", str(tmp_path / "bad"),
                                       f"data.source={pairs / 'train.parquet'}", "data.val_split=null"])
    assert refused.exit_code == 2 and 'train.parquet row 1: field "images" must be a list' in refused.output
