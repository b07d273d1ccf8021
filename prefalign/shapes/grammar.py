"""The shapes-world prompt grammar: `Scene` ⟷ prompt text, both ways.

Grammar (canonical form written by `scene_to_prompt`; `parse_prompt` accepts it and a few variants):

    prompt   := group [relation group] ["on" ("a"|"an") background "background"]
    group    := count [size] colour shape["s"]
    count    := "a" | "an" | "one" | "two" | "three"
    size     := "small" | "large"                  (absent = medium)
    relation := "left of" | "right of" | "above" | "below"   (also "to the left of", "to the right of")

e.g. "two small red circles left of a blue square on a white background". A scene holds at most
`MAX_OBJECTS` objects in total. Everything is deterministic given a `numpy.random.Generator`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefalign.errors import PrefalignError
from prefalign.io import atomic_write_text

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Object palette (RGB in [0, 1]); chosen so every pair is ≥ 0.4 apart and far from the backgrounds.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.65, 0.20),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.90, 0.15),
    "purple": (0.60, 0.20, 0.75),
    "orange": (1.00, 0.50, 0.05),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}
DEFAULT_BACKGROUND = "white"  # what a prompt without "on a ... background" renders on
SIZES: tuple[str, ...] = ("small", "large")  # None = medium
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MAX_OBJECTS = 3
COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_NUMBER_WORDS = {2: "two", 3: "three"}
_RELATION_PHRASES = {  # token sequences the parser accepts, longest first
    ("to", "the", "left", "of"): "left of",
    ("to", "the", "right", "of"): "right of",
    ("left", "of"): "left of",
    ("right", "of"): "right of",
    ("above",): "above",
    ("below",): "below",
}
DEFAULT_SEEDS = {"train": 20240601, "val": 20240602}


@dataclass(frozen=True)
class ObjectSpec:
    """A group of `count` identical objects."""

    shape: str
    colour: str
    size: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise PrefalignError(f"ObjectSpec.shape '{self.shape}' is not one of {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise PrefalignError(f"ObjectSpec.colour '{self.colour}' is not one of {', '.join(COLOURS)}")
        if self.size is not None and self.size not in SIZES:
            raise PrefalignError(f"ObjectSpec.size '{self.size}' must be None (medium) or one of {SIZES}")
        if not 1 <= self.count <= MAX_OBJECTS:
            raise PrefalignError(f"ObjectSpec.count {self.count} must be between 1 and {MAX_OBJECTS}")


@dataclass(frozen=True)
class Scene:
    """One or two object groups, the relation of the first to the second, and a background (None = white)."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if len(self.objects) not in (1, 2):
            raise PrefalignError(f"Scene.objects has {len(self.objects)} groups; use one or two")
        if (len(self.objects) == 2) != (self.relation is not None):
            raise PrefalignError("Scene.relation is required with two object groups and forbidden with one")
        if self.relation is not None and self.relation not in RELATIONS:
            raise PrefalignError(f"Scene.relation '{self.relation}' is not one of {', '.join(RELATIONS)}")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise PrefalignError(
                f"Scene.background '{self.background}' is not one of {', '.join(BACKGROUNDS)}"
            )
        if self.num_objects > MAX_OBJECTS:
            raise PrefalignError(f"Scene has {self.num_objects} objects; at most {MAX_OBJECTS} are allowed")

    @property
    def num_objects(self) -> int:
        return sum(spec.count for spec in self.objects)

    @property
    def background_rgb(self) -> tuple[float, float, float]:
        return BACKGROUNDS[self.background or DEFAULT_BACKGROUND]


def _group_text(spec: ObjectSpec) -> str:
    words = [w for w in (spec.size, spec.colour) if w]
    if spec.count == 1:
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words, spec.shape])
    return " ".join([_NUMBER_WORDS[spec.count], *words, spec.shape + "s"])


def scene_to_prompt(scene: Scene) -> str:
    """Canonical prompt text of a scene (the inverse of `parse_prompt`)."""
    text = _group_text(scene.objects[0])
    if scene.relation is not None:
        text += f" {scene.relation} {_group_text(scene.objects[1])}"
    if scene.background is not None:
        text += f" on a {scene.background} background"
    return text


def _parse_error(text: str, tokens: Sequence[str], i: int, expected: str) -> PrefalignError:
    word = tokens[i] if i < len(tokens) else "<end of prompt>"
    return PrefalignError(
        f"shapes prompt {text!r}: cannot parse word {word!r} (word {i + 1}); expected {expected}"
    )


def _parse_group(text: str, tokens: Sequence[str], i: int) -> tuple[ObjectSpec, int]:
    if i >= len(tokens) or tokens[i] not in COUNT_WORDS:
        raise _parse_error(text, tokens, i, "a count (a, an, one, two, three)")
    count = COUNT_WORDS[tokens[i]]
    i += 1
    size = None
    if i < len(tokens) and tokens[i] in SIZES:
        size = tokens[i]
        i += 1
    if i >= len(tokens) or tokens[i] not in COLOURS:
        raise _parse_error(text, tokens, i, f"a colour ({', '.join(COLOURS)})")
    colour = tokens[i]
    i += 1
    word = tokens[i] if i < len(tokens) else ""
    shape = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
    if shape not in SHAPES:
        raise _parse_error(text, tokens, i, f"a shape ({', '.join(SHAPES)}, or plural)")
    return ObjectSpec(shape=shape, colour=colour, size=size, count=count), i + 1


@functools.lru_cache(maxsize=65536)
def parse_prompt(text: str) -> Scene:
    """Parse prompt text into a `Scene`; raises PrefalignError naming the first word it cannot parse."""
    tokens = re.sub(r"[.,;!]", " ", text.lower()).split()
    first, i = _parse_group(text, tokens, 0)
    objects, relation = [first], None
    for phrase, name in _RELATION_PHRASES.items():
        if tuple(tokens[i : i + len(phrase)]) == phrase:
            relation = name
            second, i = _parse_group(text, tokens, i + len(phrase))
            objects.append(second)
            break
    background = None
    if i < len(tokens):
        if tokens[i] != "on":
            expected = "a relation (left of, right of, above, below) or 'on a <colour> background'"
            raise _parse_error(
                text, tokens, i, expected if relation is None else "'on a <colour> background'"
            )
        if i + 1 >= len(tokens) or tokens[i + 1] not in ("a", "an"):
            raise _parse_error(text, tokens, i + 1, "'a' as in 'on a white background'")
        if i + 2 >= len(tokens) or tokens[i + 2] not in BACKGROUNDS:
            raise _parse_error(text, tokens, i + 2, f"a background colour ({', '.join(BACKGROUNDS)})")
        background = tokens[i + 2]
        if i + 3 >= len(tokens) or tokens[i + 3] != "background":
            raise _parse_error(text, tokens, i + 3, "the word 'background'")
        if i + 4 < len(tokens):
            raise _parse_error(text, tokens, i + 4, "the end of the prompt")
    return Scene(objects=tuple(objects), relation=relation, background=background)


def _choice(rng: np.random.Generator, options: Sequence, p: Sequence[float] | None = None):
    """rng.choice without its per-call overhead (it dominated scene sampling)."""
    if p is None:
        return options[int(rng.integers(len(options)))]
    u, total = rng.random(), 0.0
    for option, weight in zip(options, p, strict=True):
        total += weight
        if u < total:
            return option
    return options[-1]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: one group (p=0.5; 1/2/3 objects w.p. .5/.3/.2) or two related groups (1+1, 2+1, 1+2)."""
    if rng.random() < 0.5:
        counts = (_choice(rng, (1, 2, 3), p=(0.5, 0.3, 0.2)),)
    else:
        counts = _choice(rng, ((1, 1), (2, 1), (1, 2)), p=(0.6, 0.2, 0.2))
    specs: list[ObjectSpec] = []
    while len(specs) < len(counts):
        spec = ObjectSpec(
            shape=_choice(rng, SHAPES),
            colour=_choice(rng, tuple(COLOURS)),
            size=_choice(rng, (None, "small", "large"), p=(0.4, 0.3, 0.3)),
            count=counts[len(specs)],
        )
        # Two groups must differ in colour or shape, or the relation between them would be unobservable.
        if all((spec.shape, spec.colour) != (s.shape, s.colour) for s in specs):
            specs.append(spec)
    relation = _choice(rng, RELATIONS) if len(specs) == 2 else None
    background = _choice(rng, (None, *BACKGROUNDS))
    return Scene(objects=tuple(specs), relation=relation, background=background)


def sample_prompts(n: int, seed: int, exclude: Iterable[str] = ()) -> list[str]:
    """`n` distinct prompts from `sample_scene`, in draw order, skipping any in `exclude`."""
    rng = np.random.default_rng(seed)
    seen = set(exclude)
    prompts: list[str] = []
    while len(prompts) < n:
        prompt = scene_to_prompt(sample_scene(rng))
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def make_prompt_sets(n_train: int = 2000, n_val: int = 200) -> tuple[list[str], list[str]]:
    """The project's train prompts and disjoint validation prompts (seeds in DEFAULT_SEEDS)."""
    train = sample_prompts(n_train, DEFAULT_SEEDS["train"])
    return train, sample_prompts(n_val, DEFAULT_SEEDS["val"], exclude=train)


def write_prompt_sets(root: str | Path, n_train: int = 2000, n_val: int = 200) -> tuple[Path, Path]:
    """Write `shapes_train.txt` and `shapes_val.txt` from `make_prompt_sets` into `root` (atomically).

    These are the files shipped in prompts/; rerunning `write_prompt_sets("prompts")` reproduces them exactly.
    """
    root = Path(root)
    paths = (root / "shapes_train.txt", root / "shapes_val.txt")
    for path, prompts in zip(paths, make_prompt_sets(n_train, n_val), strict=True):
        atomic_write_text(path, "\n".join(prompts) + "\n")
    return paths


def vocabulary() -> list[str]:
    """Every word the grammar can produce or parse (the shapes-clip text tower's vocabulary)."""
    words = set(COUNT_WORDS) | set(SIZES) | set(COLOURS) | set(BACKGROUNDS)
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    words |= {w for phrase in _RELATION_PHRASES for w in phrase} | {"on", "background"}
    return sorted(words)
