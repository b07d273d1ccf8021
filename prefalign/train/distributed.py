"""How the training loop spreads over processes: `train.distributed` ddp (accelerate wraps the network in DDP, every
process holds all weights) or fsdp (torch's FSDP2 `fully_shard`: weights, gradients and optimizer state sharded over
the processes; accelerate still sets up the process group, autocast and gathering).

FSDP is applied here rather than through accelerate's plugin, which falls back to DDP on CPU; `fully_shard` shards
on gloo CPU processes as on GPUs. Sharded parameters are DTensors: every process must take part in each forward
pass, and checkpoints hold the full tensors (gathered), so a run resumes with any number of processes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from prefalign.errors import PrefalignError

MODES = ("ddp", "fsdp")
T = TypeVar("T")


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def sharding(mode: str) -> bool:
    """Whether `train.distributed=mode` shards: fsdp with more than one process (one process has nothing to shard)."""
    dist = torch.distributed
    return mode == "fsdp" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def block_lists(module: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The outermost ModuleLists named `*blocks` (diffusers' down/up/transformer blocks): the FSDP units."""
    chosen: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and name.rpartition(".")[2].endswith("blocks") and \
                not any(name.startswith(f"{c}.") for c in chosen):
            chosen.append(name)
    return [module.get_submodule(name) for name in chosen]


def shard(module: torch.nn.Module) -> None:
    """FSDP2 in place: each block its own unit (its weights gathered only while it runs), then the root.
    Every unit reshards after its forward pass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # On the module's device: the default mesh is CUDA wherever a GPU exists, also for a --device cpu run.
    mesh = init_device_mesh(next(module.parameters()).device.type, (torch.distributed.get_world_size(),))
    for blocks in block_lists(module):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)  # the root too: gradient-free passes leave shards


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with its parameters on the meta device (no memory): `gather_module` fills it. Buffers are
    copied, as non-persistent ones are in no state dict."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def gather_module(module: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module | None:
    """The full weights of the sharded `module` in a copy of its `skeleton` `plain`, on the main process (None
    elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_full_options())
    if torch.distributed.get_rank() != 0:
        return None
    gathered = copy.deepcopy(plain)
    gathered.load_state_dict(state, assign=True)
    return gathered


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process calls it); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A full tensor `value` sharded as `reference` is (on its device); unchanged when `reference` is no shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor):
        return value
    return distribute_tensor(value.to(reference.device), reference.device_mesh, reference.placements)


def _plain_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict; for a sharded `module` the full one, keyed by parameter names, on the main
    process (empty elsewhere; every process must call it)."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, _plain_optimizer(optimizer), options=_full_options())


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what `optimizer_state` returned (every process, each with the whole state)."""
    by_name = any(isinstance(key, str) for key in state["state"])  # how a sharded run keys it
    if state["state"] and by_name != is_sharded(module):
        raise PrefalignError("the checkpoint was written " + ("with" if by_name else "without") + " sharding: resume "
                             "with its train.distributed (fsdp shards only with several processes)")
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, _plain_optimizer(optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def spread_calls(fn: Callable[[T], object], items: Sequence[T], accelerator=None) -> list | None:
    """`[fn(item) for item in items]` with the items dealt round-robin over the processes; the results in order on
    the main process, None elsewhere. Every process makes the same number of calls (a short one repeats the first
    item and drops the result), as sharded weights need every process in each forward pass."""
    if accelerator is None or accelerator.num_processes == 1:
        return [fn(item) for item in items]
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = range(rank, len(items), world)
    results = [(i, fn(items[i])) for i in mine]
    for _ in range(-(-len(items) // world) - len(mine)):
        fn(items[0])
    gathered = gather_object(results)
    return [r for _, r in sorted(gathered, key=lambda pair: pair[0])] if accelerator.is_main_process else None
