"""Overhead of the `prefalign bench` harness vs a bare loop over the same generator and reward; its memory.

Both paths use the same objects: the shapes teacher built by the harness's own generator spec (DDIM + CFG,
`prefalign.bench.generators`) and `prefalign.rewards.load("shapes-oracle")`, the same prompts, image seeds and
batch size. The bare loop is `images = generate(prompts, seeds); reward.score(images, prompts)` per batch,
with nothing written. The harness run (cold cache) adds PNG writes, batch records, reading the PNGs back for
scoring, the bootstrap statistics and every report (CSV, markdown, HTML gallery, bar plot). End-to-end
images/s include model loading on both sides. Repeats alternate which path runs first; the best wall time and
the best CPU time (process_time, which other jobs on a shared machine barely move) of each are reported.

Memory: the harness runs in fresh subprocesses at N and 4N prompts; their peak RSS (ru_maxrss) should match,
since images stream through in batches and only per-image scores are kept.

Usage (what RESULTS.md records):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_overhead.py --num-prompts 64 --samples-per-prompt 4 \
        --steps 25 --batch-size 64 --repeats 2 --memory-prompts 16 --out /tmp/bench_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prefalign.bench.generators import resolve_generator
from prefalign.bench.harness import BENCH_DEFAULTS, make_items, run_bench
from prefalign.bench.suites import load_suite
from prefalign.rewards import load as load_reward
from prefalign.shapes.teacher import SHIPPED_TEACHER, build_teacher


def teacher_dir(scratch: Path) -> tuple[Path, str]:
    """The shipped teacher, or (while it has not been trained) a random-weight one of the same architecture:
    sampling cost depends on the architecture only."""
    if (SHIPPED_TEACHER / "model_index.json").is_file():
        return SHIPPED_TEACHER, "shipped checkpoint"
    path = scratch / "teacher"
    build_teacher().save_pretrained(path)
    return path, "random weights, DEFAULT_ARCH (shipped checkpoint absent)"


def bench_config(args: argparse.Namespace, teacher: Path, out: Path, num_prompts: int) -> dict:
    spec = f"shapes-teacher:{teacher}?steps={args.steps}&cfg={args.cfg}&name=teacher"
    return {
        **BENCH_DEFAULTS,
        "suite": "shapes-val",
        "generators": [spec],
        "rewards": ["shapes-oracle"],
        "num_prompts": num_prompts,
        "samples_per_prompt": args.samples_per_prompt,
        "seed": 0,
        "batch_size": args.batch_size,
        "device": "cpu",
        "out": str(out),
    }


def bare_loop(config: dict) -> tuple[float, float]:
    """(wall, CPU) seconds for the same generation + scoring with nothing cached, written or aggregated."""
    start, cpu = time.perf_counter(), time.process_time()
    items = make_items(
        load_suite("shapes-val", num_prompts=config["num_prompts"]), config["samples_per_prompt"], 0
    )
    generate = resolve_generator(config["generators"][0]).build(torch.device("cpu"))
    reward = load_reward("shapes-oracle")
    scores = []
    for i in range(0, len(items), config["batch_size"]):
        batch = items[i : i + config["batch_size"]]
        prompts = [it.prompt for it in batch]
        images = generate(prompts, [it.seed for it in batch])
        scores.append(reward.score(images, prompts, batch_size=config["batch_size"]))
    assert len(torch.cat(scores)) == len(items)
    return time.perf_counter() - start, time.process_time() - cpu


def harness(config: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one `run_bench` (cold cache unless `config["out"]` already holds the run)."""
    start, cpu = time.perf_counter(), time.process_time()
    run_bench(config, log=lambda _: None)
    return time.perf_counter() - start, time.process_time() - cpu


def memory_child(args: argparse.Namespace) -> None:
    """Run one harness pass and print the process's peak RSS in MB (Linux ru_maxrss is in KiB)."""
    config = bench_config(args, Path(args.teacher), Path(args.child_out), args.num_prompts)
    run_bench(config, log=lambda _: None)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-prompts", type=int, default=25, help="N for the N vs 4N memory runs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("PREFALIGN_NO_PROGRESS", "1")
    if args.child_out:
        memory_child(args)
        return
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        teacher, teacher_note = teacher_dir(scratch)
        n_images = args.num_prompts * args.samples_per_prompt
        bare, timed = [], []
        for r in range(args.repeats):  # alternate which path goes first: the load of a shared machine drifts
            config = bench_config(args, teacher, scratch / f"run{r}", args.num_prompts)
            first, second = (bare_loop, harness) if r % 2 == 0 else (harness, bare_loop)
            results = {first: first(config), second: second(config)}
            bare.append(results[bare_loop])
            timed.append(results[harness])
        cached = harness(bench_config(args, teacher, scratch / "run0", args.num_prompts))[0]
        memory = {}
        for n in (args.memory_prompts, 4 * args.memory_prompts):
            cmd = [
                sys.executable,
                __file__,
                "--num-prompts",
                str(n),
                "--samples-per-prompt",
                str(args.samples_per_prompt),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--teacher",
                str(teacher),
                "--child-out",
                str(scratch / f"mem{n}"),
            ]
            line = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            memory[f"{n * args.samples_per_prompt}_images"] = json.loads(line)["peak_rss_mb"]
    result = {
        "images": n_images,
        "teacher": teacher_note,
        "steps": args.steps,
        "cfg": args.cfg,
        "batch_size": args.batch_size,
        "bare_wall_cpu_s": bare,
        "harness_wall_cpu_s": timed,
        "bare_images_per_s": n_images / min(w for w, _ in bare),
        "harness_images_per_s": n_images / min(w for w, _ in timed),
        "harness_vs_bare_wall": min(w for w, _ in bare) / min(w for w, _ in timed),
        "harness_vs_bare_cpu": min(c for _, c in bare) / min(c for _, c in timed),
        "cached_rerun_s": cached,
        "peak_rss_mb": memory,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"load average {os.getloadavg()[0]:.1f}",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
