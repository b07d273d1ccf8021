"""Simulated labels: Bradley–Terry rates, ties, the label-noise ceiling, and the Pick-a-Pic-style dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.shapes.grammar import parse_prompt
from prefalign.shapes.labels import (
    decode_image,
    generator_pairs,
    label_noise_ceiling,
    load_preference_pairs,
    make_preference_dataset,
    noiseless_labels,
    simulate_labels,
)
from prefalign.shapes.oracle import oracle
from prefalign.shapes.render import RenderQuality, render

PICK_A_PIC_COLUMNS = {"caption", "jpg_0", "jpg_1", "label_0", "label_1"}


def test_bradley_terry_rates_and_ties() -> None:
    n = 20000
    deltas = torch.tensor([0.0, 0.005, 0.03, -0.03, 0.1])
    s1 = torch.full((n,), 0.5)
    for delta in deltas:
        labels = simulate_labels(s1 + delta, s1, 0.05, 0.01, np.random.default_rng(0))
        if abs(float(delta)) < 0.01:
            assert torch.all(labels == 0.5)
        else:
            expected = float(torch.sigmoid(delta / 0.05))
            assert abs(float(labels.mean()) - expected) < 0.015
            assert set(labels.unique().tolist()) <= {0.0, 1.0}


def test_noise_ceiling_matches_simulated_agreement() -> None:
    rng = np.random.default_rng(1)
    s0, s1 = torch.from_numpy(rng.random(40000)).float(), torch.from_numpy(rng.random(40000)).float()
    truth = noiseless_labels(s0, s1, 0.02)
    labels = simulate_labels(s0, s1, 0.1, 0.02, rng)
    decided = truth != 0.5
    agreement = float((labels[decided] == truth[decided]).float().mean())
    assert abs(label_noise_ceiling(s0, s1, 0.1, 0.02) - agreement) < 0.01
    assert label_noise_ceiling(s0, s1, 1e-4, 0.02) > 0.999  # near-zero temperature: noiseless
    with pytest.raises(PrefalignError, match="tie"):
        label_noise_ceiling(s0, s0, 0.1, 0.02)
    with pytest.raises(PrefalignError, match="temperature"):
        simulate_labels(s0, s1, 0.0, 0.02, rng)


def test_preference_dataset_layout_and_determinism(tmp_path: Path) -> None:
    info = make_preference_dataset(tmp_path / "a", n_pairs=12, seed=5, chunk=5)
    frame = pd.read_parquet(info.path)
    assert set(frame.columns) >= PICK_A_PIC_COLUMNS and len(frame) == 12
    assert {"oracle_0", "oracle_1", "true_label_0"} <= set(frame.columns)
    assert np.allclose(frame["label_0"] + frame["label_1"], 1.0)
    assert set(frame["label_0"]) <= {0.0, 0.5, 1.0}
    captions, first, second, label_0 = load_preference_pairs(info.path)
    assert first.shape == (12, 3, 32, 32) and torch.equal(
        label_0, torch.tensor(frame["label_0"].to_numpy()).float()
    )
    for caption in captions:
        parse_prompt(caption)
    # The stored oracle columns are the oracle of exactly the images a reader decodes.
    for images, column in ((first, "oracle_0"), (second, "oracle_1")):
        assert torch.allclose(
            oracle(images, captions), torch.tensor(frame[column].to_numpy()).float(), atol=1e-6
        )
    meta = json.loads((tmp_path / "a" / "train.json").read_text())
    assert meta["n_pairs"] == 12 and meta["image_source"] == "web"
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")] == []  # no temp files left
    again = make_preference_dataset(tmp_path / "b", n_pairs=12, seed=5, chunk=12)
    assert pd.read_parquet(again.path).equals(frame)
    hotter = make_preference_dataset(tmp_path / "c", n_pairs=12, seed=5, temperature=0.5)
    assert pd.read_parquet(hotter.path)["jpg_0"].equals(frame["jpg_0"])  # labels change, images do not


def test_pluggable_image_source(tmp_path: Path) -> None:
    def sampler(prompts: list[str], rng: np.random.Generator) -> torch.Tensor:
        blur = float(rng.uniform(0, 1.5))
        return torch.stack(
            [render(parse_prompt(p), rng=rng, quality=RenderQuality(blur=blur)) for p in prompts]
        )

    source = generator_pairs(sampler, ["a red circle", "two blue squares on a black background"])
    info = make_preference_dataset(tmp_path, n_pairs=8, seed=0, image_source=source, split="validation")
    frame = pd.read_parquet(tmp_path / "validation.parquet")
    assert info.image_source == "source" and set(frame["model_0"]) == {"source"}
    assert set(frame["caption"]) <= {"a red circle", "two blue squares on a black background"}
    assert decode_image(frame["jpg_1"][0]).shape == (3, 32, 32)


def test_dataset_user_errors(tmp_path: Path) -> None:
    with pytest.raises(PrefalignError, match="image_source 'painter'"):
        make_preference_dataset(tmp_path, n_pairs=2, seed=0, image_source="painter")
    with pytest.raises(PrefalignError, match="not found"):
        load_preference_pairs(tmp_path / "missing.parquet")


def test_teacher_pairs_are_on_policy_samples_of_training_prompts(tmp_path: Path) -> None:
    from prefalign.shapes.prompts import prompt_set

    info = make_preference_dataset(tmp_path, 2, seed=0, image_source="teacher")
    frame = pd.read_parquet(info.path)
    assert info.image_source == "teacher" and len(frame) == 2
    assert set(frame["caption"]) <= set(prompt_set("train"))
    assert (frame["jpg_0"] != frame["jpg_1"]).all()  # two different samples of one prompt
