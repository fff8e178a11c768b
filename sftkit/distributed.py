"""Process-group setup and the few collectives training needs; a single process is world size 1.

Launch with `torchrun --nproc_per_node N -m sftkit_cli.main train ...` (or NPROC_PER_NODE=N sftkit train).
CPU runs use gloo, CUDA runs NCCL with one GPU (or one group of GPUs) per rank.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SftkitError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device_type: str, backend: str | None = None) -> World:
    """Join the process group torchrun describes in the environment; world size 1 without it.

    backend: nccl, gloo or mpi (ms-swift's ddp_backend); default nccl on CUDA, gloo on CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if backend == "nccl" and device_type != "cuda":
        raise SftkitError("ddp_backend nccl needs CUDA GPUs: use gloo on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def sum_int(value: int, world: World) -> int:
    """Sum an integer over ranks (e.g. trainable tokens of the accumulation window)."""
    return int(_reduce([value], torch.int64, dist.ReduceOp.SUM, world)[0])


def max_int(value: int, world: World) -> int:
    """The largest of an integer over ranks (e.g. how many batches every rank must run in lockstep)."""
    return int(_reduce([value], torch.int64, dist.ReduceOp.MAX, world)[0])


def all_true(flag: bool, world: World) -> bool:
    """Whether a condition holds on every rank (e.g. every rank's generation has finished)."""
    return -max_int(-int(flag), world) == 1


def sum_floats(values: list[float], world: World) -> list[float]:
    return _reduce(values, torch.float64, dist.ReduceOp.SUM, world)


def _reduce(values: list, dtype: torch.dtype, op, world: World) -> list:
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=dtype)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def broadcast(value, world: World):
    """Rank 0's value on every rank (any picklable object)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value, world: World) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def relaunch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that reruns this sftkit command line in `nproc` processes."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "sftkit_cli.main", *argv]
