"""The shapes prompt suites (`prompts/shapes_{train,val}.txt`), regenerated in code so an installed package has them."""

from __future__ import annotations

import functools

from prefalign.errors import PrefalignError
from prefalign.shapes.grammar import make_prompt_sets

SPLITS = ("train", "val")


@functools.cache
def prompt_set(split: str) -> tuple[str, ...]:
    """The `split` prompts ("train": 2000, "val": 200, disjoint); identical to the files shipped in prompts/."""
    if split not in SPLITS:
        raise PrefalignError(f"unknown shapes prompt split '{split}'; use train or val")
    return tuple(make_prompt_sets()[SPLITS.index(split)])
