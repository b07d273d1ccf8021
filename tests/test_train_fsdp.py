"""`train.distributed=fsdp` on 2 CPU processes (torchrun, gloo): the policy really is sharded, training with periodic
evaluation runs end to end, matches one process with the same global batch, resumes exactly and saves a pipeline."""

import json

import pytest
import torch

from prefalign.diffusion.models import DiffusionModel
from prefalign.diffusion.tiny import save_tiny_pipeline, tiny_pipeline
from prefalign.errors import PrefalignError
from prefalign.runs import start_run
from prefalign.shapes.labels import make_preference_dataset
from prefalign.train import distributed, dpo
from prefalign.train.common import MetricsLog

# Records, per process, the parameter elements each sharded network keeps against its full size.
SCRIPT = """
import json, sys
from pathlib import Path
import torch
from prefalign import schemas
from prefalign.runs import start_run
from prefalign.train import distributed, dpo

real_shard = distributed.shard

def recording_shard(module):
    real_shard(module)
    rank = torch.distributed.get_rank()
    sizes = [[p.to_local().numel(), p.numel()] for p in module.parameters()]
    with open(Path(sys.argv[1]) / f"shards{rank}.jsonl", "a") as f:
        f.write(json.dumps(sizes) + "\\n")

distributed.shard = recording_shard
config, run_dir = start_run(dpo.DEFAULTS, None, sys.argv[2:], schema=schemas.DPO, out=sys.argv[1], device="cpu")
dpo.train(config, run_dir, log=lambda _: None)
"""


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_two_processes_shard_and_match_one_process(tmp_path, launch, lora):
    """Full fine-tuning with a sharded copied reference, and LoRA with the adapter-disabled reference; the full
    case also resumes: 2 steps, then 2 more, equal to 4 straight steps."""
    pixel = str(save_tiny_pipeline(tmp_path / "pixel", "pixel"))
    make_preference_dataset(tmp_path / "pairs", 24, seed=3)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    # LoRA also keeps its best evaluation: the main process decides, both save the gathered weights
    policy = ["policy.lora_rank=4", "policy.reference=adapter", "eval.keep_best=shapes-oracle"] if lora else []
    common = [f"model={pixel}", f"data.source={tmp_path / 'pairs' / 'train.parquet'}", "train.lr=1e-3",
              "train.log_every=1", "train.checkpoint_every=2", "train.ema_decay=0.9", "train.prompt_dropout=0.5",
              "eval.every=2", "eval.num_prompts=3", "eval.steps=2", "eval.batch_size=2", "eval.rewards=[shapes-oracle]",
              *policy]
    fsdp = [*common, "train.distributed=fsdp", "train.batch_size=1"]
    one, run_dir = start_run(dpo.DEFAULTS, None, [*common, "train.batch_size=2", "train.steps=4",
                                                  "train.distributed=fsdp"], out=str(tmp_path / "one"), device="cpu")
    dpo.train(one, run_dir, log=lambda _: None)  # one process (seeded as a launch is): fsdp has nothing to shard
    if not lora:
        launch([str(script), str(tmp_path / "two"), *fsdp, "train.steps=2"])
    launch([str(script), str(tmp_path / "two"), *fsdp, "train.steps=4", *([] if lora else ["resume=true"])])

    for rank in (0, 1):  # each sharded network (policy; copied reference) of each launch keeps about half
        for line in (tmp_path / "two" / f"shards{rank}.jsonl").read_text().splitlines():
            sizes = json.loads(line)
            assert sum(local for local, _ in sizes) < 0.6 * sum(whole for _, whole in sizes)
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two"))
    assert one["step"] == two["step"] == 4 and one["fb_calls"] == two["fb_calls"] == 4 * 2 * 2
    assert set(two["optimizer"]["state"]) == set(two["trainable"])  # the full optimizer state, by parameter name
    names = sorted(n for n in one["trainable"] if not lora or "lora_B" in n)
    update_one, update_two = (torch.cat([(s["trainable"][k] - base).flatten() for k, base in zip(
        names, _initial(names, lora), strict=True)]) for s in (one, two))
    assert update_one.abs().mean() > 1e-4
    assert (update_one - update_two).abs().mean() < 1e-2 * update_one.abs().mean()

    rows_one, rows_two = (MetricsLog(tmp_path / d / "eval.csv").rows for d in ("one", "two"))
    assert [r["step"] for r in rows_two] == [0, 2, 4]
    for a, b in zip(rows_one, rows_two, strict=True):  # evaluation batches spread over the processes
        assert b["shapes-oracle"] == pytest.approx(a["shapes-oracle"], abs=1e-4)
    saved, expected = (DiffusionModel.from_pretrained(tmp_path / d / "model").denoiser.state_dict()
                       for d in ("two", "one"))
    assert saved.keys() == expected.keys()  # a plain pipeline, LoRA merged
    assert max(float((saved[k] - expected[k]).abs().max()) for k in saved) < 1e-3
    if lora:
        kept = json.loads((tmp_path / "two" / "model" / "best.json").read_text())
        assert kept["shapes-oracle"] == pytest.approx(max(r["shapes-oracle"] for r in rows_two), abs=1e-5)
    if not lora:
        launch([str(script), str(tmp_path / "straight"), *fsdp, "train.steps=4", "eval.every=0"])
        straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
        for name, value in two["trainable"].items():  # exact resume
            assert torch.equal(value, straight["trainable"][name]), name
        for x, y in zip(two["ema"], straight["ema"], strict=True):
            assert torch.equal(x, y)


def _initial(names: list[str], lora: bool) -> list[torch.Tensor]:
    """The compared parameters before training: the tiny pipeline's weights, or LoRA's B, which starts at zero."""
    if lora:
        return [torch.zeros(()) for _ in names]
    base = tiny_pipeline("pixel").denoiser.state_dict()
    return [base[n] for n in names]


def test_one_block_list_per_network_and_single_process_does_not_shard():
    denoiser = tiny_pipeline("pixel").denoiser
    lists = distributed.block_lists(denoiser)
    assert lists and all(isinstance(m, torch.nn.ModuleList) for m in lists)
    assert not any(a is not b and any(m is b for m in a.modules()) for a in lists for b in lists)  # outermost only
    assert not distributed.sharding("fsdp") and not distributed.sharding("ddp")  # no process group here


def test_spread_calls_without_processes_is_a_plain_map():
    assert distributed.spread_calls(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]


def test_a_sharded_runs_checkpoint_does_not_resume_unsharded():
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    state = {"state": {"weight": {"step": torch.tensor(1.0)}}, "param_groups": []}  # keyed by name, as fsdp writes
    with pytest.raises(PrefalignError, match=r"written with sharding: resume with its train\.distributed"):
        distributed.load_optimizer_state(layer, optimizer, state)
