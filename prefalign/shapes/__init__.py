"""The shapes world: a CPU-scale text-to-image world with a ground-truth preference oracle.

grammar (Scene ⟷ prompt), render (Scene → image), webdata (the pretraining distribution), oracle (ground-truth
score in [0, 1]), labels (simulated Bradley–Terry preference datasets), clip (the small shapes-clip model) and
rewards (the `shapes-oracle` and `shapes-clip` reward models, built-in entries of the reward registry). `labels` and `clip` are imported on demand
(they pull in pandas / train a model). See docs/shapes.md.
"""

from prefalign.shapes.grammar import (
    BACKGROUNDS,
    COLOURS,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    Scene,
    make_prompt_sets,
    parse_prompt,
    sample_prompts,
    sample_scene,
    scene_to_prompt,
)
from prefalign.shapes.oracle import detect_objects, oracle, oracle_breakdown
from prefalign.shapes.render import RenderQuality, render, render_batch
from prefalign.shapes.webdata import WEB_RATES, WebDataset, make_web_dataset, sample_web_pair

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "WEB_RATES",
    "ObjectSpec",
    "RenderQuality",
    "Scene",
    "WebDataset",
    "detect_objects",
    "make_prompt_sets",
    "make_web_dataset",
    "oracle",
    "oracle_breakdown",
    "parse_prompt",
    "render",
    "render_batch",
    "sample_prompts",
    "sample_scene",
    "sample_web_pair",
    "scene_to_prompt",
]
