"""Process-group plumbing for torchrun / torch elastic, and printing from rank 0 only."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # ranks on this machine (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from storage.errors import GptpipeError

        raise GptpipeError("device=cuda was asked for but no CUDA device is visible")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(requested_device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment; one rank without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, device, local_world_size)


def teardown(ok: bool = True) -> None:
    """Leave the process group; call it after dropping the DDP model and optimizer.

    ok: this rank finished its work. Then every rank meets at a barrier before the group is
    destroyed: without that, and without dropping the model and collecting garbage first, a
    quarter of torchrun runs here died with `terminate called without an active exception` at
    exit. After an error (ok=False) the other ranks may be inside a collective this rank will
    never join (DDP's gradient all-reduce), so a barrier would hang the whole job: the group is
    aborted instead, this rank exits non-zero, and torchrun's agent stops the other ranks.
    """
    gc.collect()
    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
        dist.destroy_process_group()
    else:
        abort()


def abort() -> None:
    """Drop the process group without waiting for the other ranks.

    `destroy_process_group` flushes NCCL's pending collectives, which blocks when a peer never
    joins them; torch's (experimental) `_abort_process_group` is meant for this bail-out. Older
    torch without it falls back to destroying the group, which gloo does without waiting.
    """
    from torch.distributed import distributed_c10d

    getattr(distributed_c10d, "_abort_process_group", dist.destroy_process_group)()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def broadcast_from_main(make: Callable[[], T], info: DistInfo) -> T:
    """make() on rank 0, its result on every rank: one decision for the whole job (a probe of
    the machine, say), even where ranks would measure differently."""
    if not info.distributed:
        return make()
    box = [make() if info.is_main else None]
    dist.broadcast_object_list(
        box, src=0, device=info.device if info.device.type == "cuda" else None
    )
    return box[0]


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
