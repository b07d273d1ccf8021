"""The shapes grammar: Scene ⟷ prompt text round trips, parse errors name the word, sampling is seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prefalign.errors import PrefalignError
from prefalign.shapes.grammar import (
    MAX_OBJECTS,
    ObjectSpec,
    Scene,
    parse_prompt,
    sample_prompts,
    sample_scene,
    scene_to_prompt,
    vocabulary,
    write_prompt_sets,
)

REPO = Path(__file__).resolve().parents[1]


def test_example_prompt_parses_to_the_intended_scene() -> None:
    scene = parse_prompt("two small red circles left of a blue square on a white background")
    assert scene == Scene(
        objects=(ObjectSpec("circle", "red", "small", 2), ObjectSpec("square", "blue", None, 1)),
        relation="left of",
        background="white",
    )
    assert scene.num_objects == 3


def test_sampled_scenes_round_trip_and_respect_limits() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = sample_scene(rng)
        assert parse_prompt(scene_to_prompt(scene)) == scene
        assert 1 <= scene.num_objects <= MAX_OBJECTS
        assert set(scene_to_prompt(scene).split()) <= set(vocabulary())


def test_parser_accepts_variants() -> None:
    assert parse_prompt("An orange triangle to the right of one green circle.") == parse_prompt(
        "an orange triangle right of a green circle"
    )
    assert scene_to_prompt(parse_prompt("a orange square")) == "an orange square"


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("two small pink circles", "'pink'"),
        ("a red hexagon", "'hexagon'"),
        ("four red circles", "'four'"),
        ("a red circle beside a blue square", "'beside'"),
        ("a red circle on a purple background", "'purple'"),
        ("a red circle left of", "'<end of prompt>'"),
    ],
)
def test_parse_errors_name_the_word(text: str, word: str) -> None:
    with pytest.raises(PrefalignError, match=word):
        parse_prompt(text)


def test_scene_limits_are_enforced() -> None:
    with pytest.raises(PrefalignError, match="at most 3"):
        parse_prompt("three red circles left of a blue square")
    with pytest.raises(PrefalignError, match="relation"):
        Scene(objects=(ObjectSpec("circle", "red"), ObjectSpec("square", "blue")))


def test_sampling_is_deterministic_and_prompt_sets_are_disjoint(tmp_path: Path) -> None:
    assert sample_prompts(50, 3) == sample_prompts(50, 3)
    assert len(set(sample_prompts(50, 3))) == 50
    train, val = write_prompt_sets(tmp_path, n_train=40, n_val=10)
    train_set = set(train.read_text().split("\n")) - {""}
    val_set = set(val.read_text().split("\n")) - {""}
    assert len(train_set) == 40 and len(val_set) == 10 and not train_set & val_set


def test_shipped_prompt_files_are_reproduced(tmp_path: Path) -> None:
    """prompts/shapes_{train,val}.txt are exactly what write_prompt_sets writes."""
    train, val = write_prompt_sets(tmp_path)
    assert train.read_text() == (REPO / "prompts" / "shapes_train.txt").read_text()
    assert val.read_text() == (REPO / "prompts" / "shapes_val.txt").read_text()
