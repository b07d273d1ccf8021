"""Generators for `prefalign bench` and `prefalign generate`: a spec string → a lazily built image source.

Spec: `KIND[:TARGET][?key=value&key=value]`, or a mapping `{"spec": ..., key: value}` in a config file:
- `shapes-teacher[:DIR]` — the shapes teacher (default: the shipped checkpoint), DDIM + CFG.
- `shapes-ideal`, `shapes-web` — the shapes world's references: ideal renders and web (pretraining) data.
- `diffusers:DIR_OR_HUB_ID` — any diffusers SD/SDXL/PixArt pipeline (or pixel-space prefalign pipeline),
  sampled with prefalign's DDIM + CFG (`prefalign.diffusion.generate.sample_images`); no safety checker.
- `pipeline:DIR_OR_HUB_ID` — any diffusers pipeline run by its own `__call__`, with its own scheduler and
  defaults (SD3, FLUX, SANA, SDXL-Turbo, LCM … as their authors run them), one seeded CPU `torch.Generator` per
  image and no safety checker; only the options given (steps, cfg, negative, resolution) are passed on.
- a bare directory holding `model_index.json` — a prefalign run directory that saved a pipeline.
- `one-step:RUN_DIR` — a one-step generator trained by `prefalign align --method dipp` (one denoiser
  evaluation per image; options dtype, batch). A bare directory holding one (`one_step.json` in it or in its
  `generator/`) resolves to this kind.
Sampler options: steps, cfg, eta, negative (negative prompt), resolution (square, pixels), dtype; `name=` sets
the leaderboard label. Every option is recorded (generator.json, leaderboard.md) and keys the image cache.
Adding a kind is one `register_generator(kind, factory)` call.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch

from prefalign import __version__
from prefalign.diffusion.generate import ImageSource
from prefalign.diffusion.hub import resolve_pipeline_dir
from prefalign.diffusion.one_step import META_FILE, generator_dir, load_generator, one_step_source
from prefalign.errors import PrefalignError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Each diffusers pipeline's __call__ defaults (num_inference_steps, guidance_scale); pixel: shapes teacher.
PIPELINE_DEFAULTS = {
    "StableDiffusionPipeline": (50, 7.5),
    "StableDiffusionXLPipeline": (50, 5.0),
    "PixArtAlphaPipeline": (20, 4.5),
    "PixArtSigmaPipeline": (20, 4.5),
    "PrefalignPixelPipeline": (25, 3.0),
    "StableDiffusion3Pipeline": (28, 7.0),
    "FluxPipeline": (28, 3.5),
}
# Pipelines whose guidance is a network input (guidance-distilled FLUX.1-dev), not a second CFG forward.
GUIDANCE_EMBEDDED = ("FluxPipeline",)
SAMPLER_OPTIONS: dict[str, type] = {
    "steps": int,
    "cfg": float,
    "eta": float,
    "negative": str,
    "resolution": int,
    "dtype": str,
}


@dataclass
class BenchGenerator:
    """A named image source with what it needs recorded: `settings` are printed in reports and, with
    `fingerprint` (the weights on disk), key the image cache; `build(device)` loads the model when called."""

    label: str
    settings: dict[str, Any]
    nfe: int | None  # denoiser evaluations per image (a CFG step counts 2); None when not a model
    build: Callable[[torch.device], ImageSource]
    fingerprint: str = ""

    def describe(self) -> str:
        """generator.json: the label, settings, NFE and cache key, as the run directory records them."""
        meta = {"label": self.label, "settings": self.settings, "nfe": self.nfe, "key": self.key}
        return json.dumps(meta, indent=2, default=str)

    @property
    def key(self) -> str:
        """Short hash of everything that determines the images (settings + weights fingerprint)."""
        blob = json.dumps(
            {"settings": self.settings, "fingerprint": self.fingerprint}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


GeneratorFactory = Callable[[str | None, dict[str, Any]], BenchGenerator]


def parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, str | None, dict[str, Any], str]:
    """(kind, target, options, label) of `KIND[:TARGET][?k=v&...]`, a bare directory or `{"spec": .., k: v}`.

    URL-style options: `+` and `%20` are spaces (write `%2B` for a literal plus).
    """
    if isinstance(spec, Mapping):
        if "spec" not in spec:
            raise PrefalignError(
                f"generator {dict(spec)}: a mapping needs a 'spec' key (e.g. spec: shapes-teacher)"
            )
        kind, target, options, _ = parse_spec(str(spec["spec"]))
        options.update({k: v for k, v in spec.items() if k != "spec"})
        label = str(options.pop("name", spec["spec"]))
        return kind, target, options, label
    text, _, query = str(spec).partition("?")
    options: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=True))
    label = str(options.pop("name", spec))
    head, sep, target = text.partition(":")
    if sep and head in _KINDS:
        return head, target or None, options, label
    if text in _KINDS:
        return text, None, options, label
    path = Path(text).expanduser()
    if path.is_dir():
        return ("one-step" if generator_dir(path) else "diffusers"), str(path), options, label
    if (re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", text) and _importable(head)) or _entry_point(text):
        return "plugin", text, options, label
    kinds = ", ".join(generator_kinds())
    raise PrefalignError(
        f"generator '{spec}': unknown kind '{head}'; use one of {kinds}, a pipeline directory or your own "
        "factory as package.module:function"
    )


# ---------------------------------------------------------------- custom generators named on the command line
ENTRY_POINT_GROUP = "prefalign.generators"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def _entry_point(name: str) -> str | None:
    """The `module:function` an installed `prefalign.generators` entry point called `name` points to."""
    from importlib.metadata import entry_points

    return next((ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)


def _plugin(target: str | None, options: dict[str, Any]) -> BenchGenerator:
    """`package.module:function` (or an entry point name): the function is a GeneratorFactory, called as
    `function(None, options)` like the factories given to `register_generator`."""
    reference = _entry_point(str(target)) or str(target)
    module_name, _, attr = reference.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise PrefalignError(f"generator {reference}: cannot import it ({err})") from None
    generator = factory(None, options)
    if not isinstance(generator, BenchGenerator):
        raise PrefalignError(f"generator {reference} returned {type(generator).__name__}, not a BenchGenerator")
    return generator


def resolve_generator(spec: str | Mapping[str, Any]) -> BenchGenerator:
    """Turn a spec into a `BenchGenerator` (checks paths and options now; loads weights only in `build`)."""
    kind, target, options, label = parse_spec(spec)
    generator = _KINDS[kind](target, options)
    generator.label = label
    return generator


def register_generator(kind: str, factory: GeneratorFactory, *, replace: bool = False) -> None:
    """Add a generator kind: `factory(target, options) -> BenchGenerator`."""
    if kind in _KINDS and _KINDS[kind] is not factory and not replace:
        raise ValueError(f"generator kind '{kind}' is already registered; pass replace=True to override it")
    _KINDS[kind] = factory


def generator_kinds() -> list[str]:
    return sorted(_KINDS)


def source_generator(
    label: str,
    source: ImageSource,
    nfe: int | None = None,
    settings: Mapping[str, Any] | None = None,
    fingerprint: str = "",
) -> BenchGenerator:
    """Wrap an in-process `ImageSource` (e.g. a model the demo just trained). `settings` (reported) and
    `fingerprint` (e.g. a hash of the config that trained it) key its image cache."""
    settings = {"kind": "source", "label": label, **(settings or {})}
    return BenchGenerator(label, settings, nfe, lambda device: source, fingerprint)


def sampler_nfe(steps: int, cfg: float, pipeline: str | None = None) -> int:
    """Denoiser evaluations per image with CFG: the [uncond; cond] batch counts as two (one for pipelines
    whose guidance is embedded)."""
    return steps * (1 if cfg == 1 or pipeline in GUIDANCE_EMBEDDED else 2)


def _options(kind: str, options: Mapping[str, Any], allowed: Mapping[str, type], defaults: Mapping) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise PrefalignError(
            f"generator {kind}: unknown option(s) {', '.join(unknown)}; allowed: name, {', '.join(allowed)}"
        )
    resolved = dict(defaults)
    for key, value in options.items():
        try:
            resolved[key] = allowed[key](value)
        except (TypeError, ValueError):
            kind_name = allowed[key].__name__
            raise PrefalignError(
                f"generator {kind}: option {key}={value!r} is not a valid {kind_name}"
            ) from None
    if resolved.get("dtype") is not None and resolved["dtype"] not in DTYPES:
        raise PrefalignError(f"generator {kind}: dtype={resolved['dtype']} is not one of {', '.join(DTYPES)}")
    if resolved.get("steps") is not None and resolved["steps"] < 1:
        raise PrefalignError(f"generator {kind}: steps={resolved['steps']} must be at least 1")
    return resolved


def dir_fingerprint(path: Path) -> str:
    """Hash of each file's relative path, size and mtime under `path`: retrained weights change it."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _default_resolution(root: Path, index: Mapping[str, Any]) -> int | None:
    """Decoded image side from the denoiser's sample_size × the VAE's downsampling, read from the configs."""
    for name in ("unet", "transformer"):
        config_path = root / name / "config.json"
        if config_path.is_file():
            size = json.loads(config_path.read_text()).get("sample_size")
            size = size[0] if isinstance(size, list) else size
            vae_path = root / "vae" / "config.json"
            factor = (
                2 ** (len(json.loads(vae_path.read_text())["block_out_channels"]) - 1)
                if (isinstance(index.get("vae"), list) and index["vae"][1] and vae_path.is_file())
                else 1
            )
            return int(size) * factor if size else None
    return None


def _read_index(root: Path) -> dict:
    try:
        return json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise PrefalignError(
            f"{root / 'model_index.json'}: unreadable ({err}); re-save the pipeline"
        ) from None


def _sampler_name(root: Path) -> str:
    """prefalign's sampler for the directory's schedule: Euler for rectified flow, DDIM for VP."""
    config_path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    flow = config.get("_class_name") == "FlowMatchEulerDiscreteScheduler" or config.get("use_flow_sigmas")
    return "euler" if flow else "ddim"


def _pipeline_generator(kind: str, root: Path, options: Mapping[str, Any]) -> BenchGenerator:
    """DDIM / Euler + CFG sampling of a diffusers-layout pipeline directory through `DiffusionModel`."""
    index = _read_index(root)
    steps, cfg = PIPELINE_DEFAULTS.get(index.get("_class_name"), (50, 7.5))
    defaults = {
        "steps": steps,
        "cfg": cfg,
        "eta": 0.0,
        "negative": "",
        "resolution": None,
        "dtype": "float32",
    }
    opts = _options(kind, options, SAMPLER_OPTIONS, defaults)
    opts["resolution"] = opts["resolution"] or _default_resolution(root, index)
    settings = {
        "kind": kind,
        "model": str(root),
        "pipeline": index.get("_class_name"),
        "sampler": _sampler_name(root),
        **opts,
    }

    def build(device: torch.device) -> ImageSource:
        from prefalign.diffusion.generate import sample_images
        from prefalign.diffusion.models import DiffusionModel

        model = DiffusionModel.from_pretrained(root, dtype=DTYPES[opts["dtype"]], device=device)
        if opts["resolution"]:
            side, factor = opts["resolution"], model.vae_scale_factor
            if side % factor:
                raise PrefalignError(f"generator {kind}: resolution={side} must be a multiple of {factor}")
            model.sample_shape = (model.sample_shape[0], side // factor, side // factor)

        def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
            images = sample_images(
                model, prompts, seeds, opts["steps"], opts["cfg"], opts["eta"], opts["negative"]
            )
            return images.float().cpu()

        return generate

    nfe = sampler_nfe(opts["steps"], opts["cfg"], index.get("_class_name"))
    return BenchGenerator(kind, settings, nfe, build, dir_fingerprint(root))


NATIVE_OPTIONS: dict[str, type] = {"steps": int, "cfg": float, "negative": str, "resolution": int, "dtype": str}


def _native_pipeline(target: str | None, options: dict[str, Any]) -> BenchGenerator:
    """A diffusers pipeline called through its own `__call__`: its scheduler, sampler and defaults."""
    if not target:
        raise PrefalignError("generator pipeline: name a pipeline, e.g. pipeline:DIR or pipeline:OWNER/NAME")
    root = resolve_pipeline_dir(target).resolve()
    index = _read_index(root)
    defaults = {"steps": None, "cfg": None, "negative": None, "resolution": None, "dtype": "float32"}
    opts = _options("pipeline", options, NATIVE_OPTIONS, defaults)
    pipeline = index.get("_class_name")
    settings = {"kind": "pipeline", "model": str(root), "pipeline": pipeline, "sampler": "pipeline", **opts}
    steps, cfg = PIPELINE_DEFAULTS.get(pipeline, (None, None))
    steps, cfg = opts["steps"] or steps, opts["cfg"] if opts["cfg"] is not None else cfg
    nfe = sampler_nfe(steps, cfg, pipeline) if steps is not None and cfg is not None else None
    call_kwargs = {name: opts[key] for key, name in (
        ("steps", "num_inference_steps"), ("cfg", "guidance_scale"), ("negative", "negative_prompt"),
        ("resolution", "height"), ("resolution", "width")) if opts[key] is not None}

    def build(device: torch.device) -> ImageSource:
        from diffusers import DiffusionPipeline

        # Pipelines with a safety checker get none (prefalign scores raw images); others take no such kwarg.
        unchecked = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        pipe = DiffusionPipeline.from_pretrained(root, torch_dtype=DTYPES[opts["dtype"]], **unchecked).to(device)
        pipe.set_progress_bar_config(disable=True)

        def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
            generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
            with torch.no_grad():
                images = pipe(prompt=list(prompts), generator=generators, output_type="pt", **call_kwargs).images
            return images.float().cpu()

        return generate

    return BenchGenerator("pipeline", settings, nfe, build, dir_fingerprint(root))


def _diffusers(target: str | None, options: dict[str, Any]) -> BenchGenerator:
    if not target:
        raise PrefalignError(
            "generator diffusers: name a pipeline, e.g. diffusers:DIR or diffusers:OWNER/NAME"
        )
    return _pipeline_generator("diffusers", resolve_pipeline_dir(target).resolve(), options)


def _shapes_teacher(target: str | None, options: dict[str, Any]) -> BenchGenerator:
    from prefalign.shapes.teacher import SHIPPED_TEACHER

    root = Path(target).expanduser().resolve() if target else SHIPPED_TEACHER
    if not (root / "model_index.json").is_file():
        hint = "run `prefalign shapes pretrain --out DIR` and pass shapes-teacher:DIR/teacher"
        raise PrefalignError(
            f"generator shapes-teacher: no teacher at {root} (model_index.json missing); {hint}"
        )
    return _pipeline_generator("shapes-teacher", root, options)


def _reference(kind: str, source_name: str) -> GeneratorFactory:
    def factory(target: str | None, options: dict[str, Any]) -> BenchGenerator:
        if target or options:
            raise PrefalignError(f"generator {kind} takes no path or options (only name=)")
        from prefalign.shapes import generators as shapes_generators

        source = getattr(shapes_generators, source_name)
        # The references are code, not weights: the package version stands for their fingerprint.
        return BenchGenerator(kind, {"kind": kind}, None, lambda device: source, f"prefalign {__version__}")

    return factory


def _one_step(target: str | None, options: dict[str, Any]) -> BenchGenerator:
    """`one-step:RUN_DIR[?dtype=float32&batch=64]`: a generator trained by `prefalign align --method dipp`."""
    root = generator_dir(target) if target else None
    if root is None:
        raise PrefalignError(
            f"generator one-step: no one-step generator at {target} ({META_FILE} missing); "
            "pass the run directory of `prefalign align --method dipp`"
        )
    opts = _options("one-step", options, {"dtype": str, "batch": int}, {"dtype": "float32", "batch": 64})
    meta = json.loads((root / META_FILE).read_text())
    settings = {"kind": "one-step", "model": str(root), "t_init": meta["t_init"], "sampler": "one-step", **opts}

    def build(device: torch.device) -> ImageSource:
        model, _ = load_generator(root, device, DTYPES[opts["dtype"]])
        return one_step_source(model, meta["t_init"], opts["batch"])

    return BenchGenerator("one-step", settings, 1, build, dir_fingerprint(root))


_KINDS: dict[str, GeneratorFactory] = {
    "shapes-teacher": _shapes_teacher,
    "shapes-ideal": _reference("shapes-ideal", "ideal_renders"),
    "shapes-web": _reference("shapes-web", "web_data_images"),
    "diffusers": _diffusers,
    "pipeline": _native_pipeline,
    "one-step": _one_step,
    "plugin": _plugin,
}
