"""Training on several processes through torch.distributed: the process group torchrun describes, the model wrapped
for data parallelism (DDP) or sharded (FSDP, torch's fully_shard), and checkpoints gathered into whole tensors so
that a run resumes on any number of processes.

One process (no torchrun) is a world of one: nothing is wrapped and the same code runs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def join(device: str = "auto") -> tuple[World, torch.device]:
    """This process's place in the run torchrun started (RANK, WORLD_SIZE, LOCAL_RANK in the environment; a world
    of one without them) and its device: the local GPU under NCCL, else the CPU under gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cuda", "cpu"):
        chosen = torch.device(device)
    elif cuda:
        chosen = torch.device("cuda", world.local_rank if world.distributed else torch.cuda.current_device())
    else:
        chosen = torch.device("cpu")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", device_id=chosen
                                if chosen.type == "cuda" else None)
    return world, chosen


def leave(world: World) -> None:
    """The end of a run that went well: every rank waits for the others before the process group goes (a rank
    that left first would close its connections under a peer still finishing its last collective)."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, mode: str, device: torch.device) -> nn.Module:
    """The module the training step calls: the model itself in a world of one; DDP around it; or, fsdp, the model
    sharded in place (each residual block its own unit, the embedding, final norm and head in the root's), which
    fully_shard returns as the same object."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    if not world.distributed:
        return model
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    return fully_shard(model)


def no_sync(wrapped: nn.Module, world: World, last_micro_batch: bool):
    """A context in which backward accumulates gradients locally (every micro-batch but the step's last)."""
    if not world.distributed or last_micro_batch:
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    return _fsdp_no_sync(wrapped)


@contextlib.contextmanager
def _fsdp_no_sync(wrapped: nn.Module):
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def rank_rows(batch: int, rank: int, size: int) -> range:
    """Rank `rank`'s rows of a global batch of `batch` rows split among `size` processes."""
    if batch % size:
        raise ValueError(f"the global batch ({batch} rows) must divide among {size} processes")
    share = batch // size
    return range(rank * share, (rank + 1) * share)


def all_sum(value: float, world: World, device: torch.device) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def gradient_scale(world: World) -> float:
    """DDP and FSDP average the ranks' gradients; a loss each rank divides by the global batch's weight must be
    scaled back up by the number of ranks to give the gradient of the global batch's mean."""
    return float(world.size)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and optimizer's state as whole tensors on the CPU, keyed by parameter name (the same for any
    number of processes; a collective: every rank calls it, rank 0 gets the tensors)."""
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optimizer_state: dict | None) -> None:
    """Whole tensors into a (possibly sharded) model and optimizer: every rank passes the same state."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
