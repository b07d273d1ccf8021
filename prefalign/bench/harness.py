"""`prefalign bench` and `prefalign generate`: prompts → images → scores → leaderboards, cached and resumable.

Run directory (`--out`):
  config.yaml, run.json (suite, seed, hash of the image list), prompts.csv
  generators/<label>-<key>/generator.json             settings and NFE (key: hash of settings + weights)
  generators/<label>-<key>/images/<prompt:05d>_<sample>.png
  generators/<label>-<key>/chunks/<start>-<stop>.json  a finished generation batch: files, seeds, seconds
  generators/<label>-<key>/scores/<reward>-<key>/<start>-<stop>.json   a finished scoring batch
  rewards/<reward>-<key>.json                         what the reward's numbers mean (RewardInfo)
  samples.csv, leaderboard.csv, leaderboard.md, gallery.html, leaderboard.png

Work is cut into batches of `batch_size` consecutive images of one fixed global list. A batch is done once its
record exists (written atomically after its PNGs), so killing a run loses only the batches in flight and a
re-run skips every finished one. A batch always holds the same images, so a resumed run and a multi-process
run (batch i goes to rank i mod world size; accelerate/torchrun) give bit-identical images and scores to one
uninterrupted process. Every reward with work to do is loaded (on the CPU) before generation starts; each
generator is loaded once per process; then one shared pass scores every reward (see "scoring" below).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from prefalign.bench.generators import DTYPES, BenchGenerator, dir_fingerprint, resolve_generator
from prefalign.bench.report import GeneratorMeta, RewardMeta, write_reports
from prefalign.bench.suites import Suite, load_suite, suite_from_prompts
from prefalign.errors import PrefalignError
from prefalign.io import atomic_path, atomic_write_text
from prefalign.progress import track
from prefalign.rewards.images import tensor_to_pil
from prefalign.rewards.multi import RewardPass
from prefalign.rewards.registry import component_names
from prefalign.rewards.registry import load as load_reward
from prefalign.runs import prepare_run_dir, resolve_device

BENCH_DEFAULTS: dict[str, Any] = {
    "suite": None,
    "prompts_file": None,  # the suite's file: COCO captions JSON, PartiPrompts.tsv, ... (--captions)
    "num_prompts": None,  # None: the whole suite
    "samples_per_prompt": 1,
    "seed": 0,
    "generators": [],  # specs (see prefalign.bench.generators)
    "rewards": [],  # names or weighted sums (see prefalign.rewards.load)
    "baseline": None,  # label for win rates; None: the first generator
    "checkpoints": {},  # reward name -> local checkpoint
    "options": {},  # reward name -> {option: value}
    "batch_size": 16,
    "device": "auto",
    "dtype": "float32",  # reward dtype; generators take ?dtype=
    "gallery_prompts": 100,
    "out": "runs/bench",
}
GENERATE_DEFAULTS: dict[str, Any] = {  # `prompts`: given directly, instead of a suite
    "suite": None, "prompts": [], "prompts_file": None, "num_prompts": None, "samples_per_prompt": 1,
    "seed": 0, "generator": None, "batch_size": 16, "device": "auto", "out": "runs/generate",
}


_DECODE_WORKERS = 2  # image-decoding processes per scoring pass
NO_GENERATOR = "no generator given; pass --generator SPEC (e.g. shapes-teacher, diffusers:DIR)"


@dataclass(frozen=True)
class Item:
    """One image to make: prompt `prompt_index` of the run, its `sample`-th seed."""

    prompt_index: int
    prompt_id: str
    prompt: str
    group: str
    sample: int
    seed: int

    @property
    def filename(self) -> str:
        return f"{self.prompt_index:05d}_{self.sample}.png"


def image_seed(seed: int, prompt_id: str, sample: int) -> int:
    """An image's noise seed: the first 31 bits of sha256("seed/prompt_id/sample"), so it depends on nothing
    else (not its batch, rank or --num-prompts)."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def make_items(suite: Suite, samples_per_prompt: int, seed: int) -> list[Item]:
    if samples_per_prompt < 1:
        raise PrefalignError(f"samples_per_prompt={samples_per_prompt} must be at least 1")
    return [Item(i, p.id, p.text, p.group, k, image_seed(seed, p.id, k))
            for i, p in enumerate(suite.prompts) for k in range(samples_per_prompt)]


class Workers:
    """This run's processes through accelerate's `PartialState`: one, or several under torchrun/accelerate."""

    def __init__(self, device: str) -> None:
        from accelerate import PartialState

        wanted = resolve_device(device)
        self.state = PartialState(cpu=wanted.type == "cpu")
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.device = self.state.device if self.world > 1 and wanted.type != "cpu" else wanted

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank


@dataclass
class RewardSpec:
    """A reward column: its spec and the checkpoints/options of its components (all of them key its cache)."""

    spec: str
    checkpoints: dict[str, str] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def dirname(self) -> str:
        files = {name: _path_fingerprint(Path(path)) for name, path in self.checkpoints.items()}
        blob = json.dumps([self.spec, self.checkpoints, files, self.options], sort_keys=True, default=str)
        return f"{_slug(self.spec)}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


@dataclass
class BenchResult:
    out: Path
    leaderboard: pd.DataFrame | None  # None on processes other than the main one
    generated: dict[str, int]  # images generated by this process in this run, per generator label
    scored: dict[str, int]  # images scored by this process in this run, per reward spec


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:48] or "x"


def _path_fingerprint(path: Path) -> str:
    if path.is_dir():
        return dir_fingerprint(path)
    stat = path.stat() if path.exists() else None
    return f"{stat.st_size}|{stat.st_mtime_ns}" if stat else "missing"


def _batches(n: int, size: int) -> list[range]:
    if size < 1:
        raise PrefalignError(f"batch_size={size} must be at least 1")
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _records(directory: Path) -> list[dict]:
    """Finished-batch records (temporary files of interrupted writes end in .tmp and are ignored)."""
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []


def _record_name(batch: range) -> str:
    return f"{batch.start:06d}-{batch.stop:06d}.json"


def claim_run(out: Path, suite: Suite, items: Sequence[Item], config: Mapping[str, Any], write: bool) -> None:
    """Check that `out` is empty or holds this image list (suite, seed, samples) made in batches of this size;
    record it if `write`. A batch is generated in one call, and batched sampling is not bit-identical across batch
    sizes, so a run continues only with the batch size it started with."""
    listing = json.dumps([(i.prompt_id, i.prompt, i.sample, i.seed) for i in items])
    identity = {"suite": suite.name, "seed": config["seed"], "prompts": len(suite.prompts),
                "samples_per_prompt": config["samples_per_prompt"], "batch_size": config["batch_size"],
                "items_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    path = out / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("items_sha256") != identity["items_sha256"]:
            raise PrefalignError(
                f"{out} holds a run with other prompts or seeds (suite {previous.get('suite')}, seed "
                f"{previous.get('seed')}, {previous.get('prompts')} prompts); pass a new --out or delete it"
            )
        if previous.get("batch_size", config["batch_size"]) != config["batch_size"]:
            raise PrefalignError(
                f"{out} was generated with batch_size {previous['batch_size']} and images depend on the batch; "
                f"continue it with --batch-size {previous['batch_size']} or pass a new --out")
    if write:
        record = {**identity, "source": suite.source, "rule": suite.rule}
        atomic_write_text(path, json.dumps(record, indent=2))
        prompts = pd.DataFrame([{"prompt_index": i, "prompt_id": p.id, "group": p.group, "prompt": p.text}
                                for i, p in enumerate(suite.prompts)])
        with atomic_path(out / "prompts.csv") as tmp:
            prompts.to_csv(tmp, index=False)


def generate_images(
    generator: BenchGenerator, items: Sequence[Item], directory: Path, batch_size: int, workers: Workers,
    log: Callable[[str], None],
) -> int:
    """Make this process's missing batches of `items` with `generator` into `directory/images`; returns the
    number of images generated (0 when all were cached; the model is then never loaded)."""
    images_dir, record_dir = directory / "images", directory / "chunks"
    done = {f for r in _records(record_dir) for f in r["files"] if (images_dir / f).is_file()}
    todo = [b for i, b in enumerate(_batches(len(items), batch_size))
            if workers.owns(i) and any(items[j].filename not in done for j in b)]
    log(f"[bench] {generator.label}: {len(items) - len(done)} of {len(items)} images to generate")
    if not todo:
        return 0
    source = generator.build(workers.device)
    generated = 0
    for index, batch in enumerate(track(todo, f"generating {generator.label}")):
        chosen = [items[j] for j in batch]
        start = time.perf_counter()
        images = source([it.prompt for it in chosen], [it.seed for it in chosen])
        seconds = time.perf_counter() - start
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[:2] != (len(chosen), 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            want = f"[{len(chosen)}, 3, H, W]"
            raise PrefalignError(f"generator {generator.label} returned {shape}, not {want}")
        for item, image in zip(chosen, images, strict=True):
            if item.filename not in done:
                with atomic_path(images_dir / item.filename) as tmp:
                    tensor_to_pil(image).save(tmp, format="PNG")
        record = {"files": [it.filename for it in chosen], "seeds": [it.seed for it in chosen],
                  "seconds": seconds, "rank": workers.rank, "warmup": index == 0}
        atomic_write_text(record_dir / _record_name(batch), json.dumps(record))
        generated += len(chosen)
    return generated


# ------------------------------------------------------------------------------------------------ scoring
# Every reward with work to do is loaded before anything is generated (a bad checkpoint fails in seconds, not
# after hours of sampling), on the CPU so generation keeps the accelerator; then one shared pass per image
# directory (prefalign.rewards.multi: decode once, shared preprocessing and towers) fills every reward's
# per-batch records.
ScorePlan = dict[str, list[tuple[Path, range]]]  # reward spec -> (image directory, batch) still to score


def plan_scoring(
    rewards: Sequence[RewardSpec], directories: Sequence[Path], items: Sequence[Item], batch_size: int,
    workers: Workers,
) -> ScorePlan:
    """This process's batches that lack a score record, per reward."""
    plan: ScorePlan = {}
    for reward in rewards:
        plan[reward.spec] = []
        for directory in directories:
            done = {f for r in _records(directory / "scores" / reward.dirname) for f in r["files"]}
            plan[reward.spec] += [(directory, b) for i, b in enumerate(_batches(len(items), batch_size))
                                  if workers.owns(i) and any(items[j].filename not in done for j in b)]
    return plan


def load_rewards(
    rewards: Sequence[RewardSpec], plan: ScorePlan, dtype: str, rewards_dir: Path, log: Callable[[str], None],
) -> dict[str, Any]:
    """Load (on the CPU) every reward that has something to score and record what its numbers mean."""
    models = {}
    for reward in rewards:
        log(f"[bench] {reward.spec}: {sum(len(b) for _, b in plan[reward.spec])} images to score")
        if not plan[reward.spec]:
            continue
        model = load_reward(reward.spec, reward.checkpoints or None, "cpu", DTYPES[dtype], per_reward=reward.options)
        info = {"spec": reward.spec, "version": model.info.version, "convention": model.info.convention,
                "higher_is_better": model.info.higher_is_better}
        atomic_write_text(rewards_dir / f"{reward.dirname}.json", json.dumps(info, indent=2))
        models[reward.spec] = model
    return models


def score_all(
    rewards: Sequence[RewardSpec], models: Mapping[str, Any], plan: ScorePlan, items: Sequence[Item],
    batch_size: int, workers: Workers,
) -> dict[str, int]:
    """Score every planned batch with one shared pass per image directory; returns images scored per spec."""
    scored = {r.spec: 0 for r in rewards}
    if not models:
        return scored
    models = {spec: model.to(workers.device) for spec, model in models.items()}
    dirnames = {r.spec: r.dirname for r in rewards}
    for directory in dict.fromkeys(d for entries in plan.values() for d, _ in entries):
        wanted = {spec: {b.start for d, b in entries if d == directory} for spec, entries in plan.items()}
        batches = sorted({b for entries in plan.values() for d, b in entries if d == directory}, key=lambda b: b.start)
        active = {spec: models[spec] for spec in models if wanted[spec]}
        chosen = [items[j] for b in batches for j in b]  # consecutive batches: the pass cuts them the same way
        scoring = RewardPass(active, batch_size=batch_size, workers=_DECODE_WORKERS)
        stream = scoring.run([directory / "images" / it.filename for it in chosen], [it.prompt for it in chosen])
        for batch, result in track(zip(batches, stream, strict=True), f"scoring {directory.name}",
                                   total=len(batches)):
            if result.failed:
                raise PrefalignError(f"{directory}: {next(iter(result.failed.values()))}; delete it and re-run")
            for spec in active:
                if batch.start in wanted[spec]:
                    record = {"files": [items[j].filename for j in batch], "scores": result.scores[spec]}
                    atomic_write_text(directory / "scores" / dirnames[spec] / _record_name(batch), json.dumps(record))
                    scored[spec] += len(batch)
    return scored


def _seconds_per_image(directory: Path) -> float:
    """Generation time per image, leaving out each process's first batch (model warm-up, allocator, kernel
    selection) whenever later batches were timed."""
    records = _records(directory / "chunks")
    records = [r for r in records if not r.get("warmup")] or records
    n = sum(len(r["files"]) for r in records)
    return sum(r["seconds"] for r in records) / n if n else float("nan")


def collect_samples(
    targets: Sequence[tuple[BenchGenerator, Path]], items: Sequence[Item], rewards: Sequence[RewardSpec],
    out: Path,
) -> pd.DataFrame:
    """One row per (generator, image): prompt, seed, image path (relative to `out`), every reward's score."""
    rows = []
    for generator, directory in targets:
        scores = {}
        for reward in rewards:
            records = _records(directory / "scores" / reward.dirname)
            pairs = (pair for r in records for pair in zip(r["files"], r["scores"], strict=True))
            scores[reward.spec] = dict(pairs)
        for item in items:
            row = {"generator": generator.label, "prompt_index": item.prompt_index,
                   "prompt_id": item.prompt_id, "group": item.group, "prompt": item.prompt,
                   "sample": item.sample, "seed": item.seed,
                   "image": str((directory / "images" / item.filename).relative_to(out))}
            for reward in rewards:
                if item.filename not in scores[reward.spec]:
                    raise PrefalignError(f"{directory}: no {reward.spec} score of {item.filename}; re-run")
                row[reward.spec] = scores[reward.spec][item.filename]
            rows.append(row)
    return pd.DataFrame(rows)


def reward_specs(
    specs: Sequence[str], checkpoints: Mapping[str, str], options: Mapping[str, Mapping[str, Any]]
) -> list[RewardSpec]:
    """Validate reward names (unknown → the list of known ones) and hand each its components' settings."""
    if not specs:
        raise PrefalignError("no reward given; pass --reward NAME (e.g. --reward hpsv2.1 or shapes-oracle)")
    parts = {spec: component_names(spec) for spec in specs}
    used = {name for names in parts.values() for name in names}
    for name in [*checkpoints, *options]:
        if name not in used:
            raise PrefalignError(f"checkpoint/option for '{name}', not among the rewards {sorted(used)}")
    return [RewardSpec(spec, {n: str(checkpoints[n]) for n in names if n in checkpoints},
                       {n: dict(options[n]) for n in names if n in options}) for spec, names in parts.items()]


def _suite(config: Mapping[str, Any]) -> Suite:
    if config.get("prompts") and config.get("suite"):
        raise PrefalignError("give either a suite or --prompt, not both")
    if config.get("prompts"):
        return suite_from_prompts("prompts", list(config["prompts"]))
    if not config.get("suite"):
        raise PrefalignError("no prompts: name a suite (e.g. shapes-val, coco-val, file:PATH) or --prompt")
    return load_suite(config["suite"], config.get("prompts_file"), config.get("num_prompts"), config["seed"])


def run_bench(
    config: Mapping[str, Any], log: Callable[[str], None] = print,
    generators: Sequence[BenchGenerator] | None = None, suite: Suite | None = None,
) -> BenchResult:
    """The whole pipeline for a resolved `BENCH_DEFAULTS`-shaped config. `generators`/`suite` given in code
    (e.g. by the demo) replace the config's specs/suite."""
    workers = Workers(config["device"])
    say = log if workers.is_main else (lambda _: None)
    suite = suite or _suite(config)
    items = make_items(suite, config["samples_per_prompt"], config["seed"])
    rewards = reward_specs(config["rewards"], config.get("checkpoints") or {}, config.get("options") or {})
    if config.get("dtype", "float32") not in DTYPES:
        raise PrefalignError(f"dtype={config['dtype']} is not one of {', '.join(DTYPES)}")
    if generators is None:
        if not config["generators"]:
            raise PrefalignError(NO_GENERATOR)
        with workers.state.main_process_first():  # a Hub download happens once, on the main process
            generators = [resolve_generator(spec) for spec in config["generators"]]
    labels = [g.label for g in generators]
    if len(set(labels)) != len(labels):
        raise PrefalignError(f"generator labels {labels} repeat; add ?name=LABEL to tell them apart")
    baseline = config.get("baseline") or (labels[0] if len(labels) > 1 else None)
    if baseline is not None and baseline not in labels:
        raise PrefalignError(f"--baseline {baseline} is not one of the generators {labels}")
    out = Path(config["out"])
    claim_run(out, suite, items, config, write=False)
    targets = [(g, out / "generators" / f"{_slug(g.label)}-{g.key}") for g in generators]
    if workers.is_main:
        prepare_run_dir(config)
        claim_run(out, suite, items, config, write=True)
        for generator, directory in targets:
            atomic_write_text(directory / "generator.json", generator.describe())
    workers.barrier()
    say(f"[bench] {suite.name}: {len(suite.prompts)} prompts × {config['samples_per_prompt']} → {out}")
    batch = config["batch_size"]
    plan = plan_scoring(rewards, [d for _, d in targets], items, batch, workers)
    models = load_rewards(rewards, plan, config.get("dtype", "float32"), out / "rewards", say)
    generated = {g.label: generate_images(g, items, d, batch, workers, say) for g, d in targets}
    workers.barrier()
    scored = score_all(rewards, models, plan, items, batch, workers)
    workers.barrier()
    board = None
    if workers.is_main:
        samples = collect_samples(targets, items, rewards, out)
        metas = [GeneratorMeta(g.label, g.settings, g.nfe, _seconds_per_image(d)) for g, d in targets]
        reward_metas = [RewardMeta(**json.loads((out / "rewards" / f"{r.dirname}.json").read_text()))
                        for r in rewards]
        context = {"suite": suite.name, "source": suite.source, "rule": suite.rule,
                   "prompts": len(suite.prompts), "samples_per_prompt": config["samples_per_prompt"],
                   "seed": config["seed"], "baseline": baseline}
        board = write_reports(out, samples, metas, reward_metas, context, config.get("gallery_prompts", 100))
        say(f"[bench] leaderboard: {out / 'leaderboard.md'}")
    workers.barrier()
    return BenchResult(out, board, generated, scored)


def run_generate(config: Mapping[str, Any], log: Callable[[str], None] = print) -> BenchResult:
    """`prefalign generate`: one generator's images for a suite (or given prompts) into `out/images`, plus
    `out/images.csv` (path, prompt, prompt_id, sample, seed) that `prefalign score --images` reads."""
    workers = Workers(config["device"])
    say = log if workers.is_main else (lambda _: None)
    if not config.get("generator"):
        raise PrefalignError(NO_GENERATOR)
    suite = _suite(config)
    items = make_items(suite, config["samples_per_prompt"], config["seed"])
    with workers.state.main_process_first():
        generator = resolve_generator(config["generator"])
    out = Path(config["out"])
    claim_run(out, suite, items, config, write=False)
    meta_path = out / "generator.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") != generator.key:
        raise PrefalignError(f"{out} holds images of another generator or settings; use a new --out")
    if workers.is_main:
        prepare_run_dir(config)
        claim_run(out, suite, items, config, write=True)
        atomic_write_text(meta_path, generator.describe())
    workers.barrier()
    generated = generate_images(generator, items, out, config["batch_size"], workers, say)
    workers.barrier()
    if workers.is_main:
        rows = [{"path": f"images/{it.filename}", "prompt": it.prompt, "prompt_id": it.prompt_id,
                 "sample": it.sample, "seed": it.seed} for it in items]
        with atomic_path(out / "images.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
    workers.barrier()
    return BenchResult(out, None, {generator.label: generated}, {})
