"""Process-group setup, launching, and the few collectives training needs; a single process is world size 1.

`NPROC_PER_NODE=N [NNODES=M NODE_RANK=i MASTER_ADDR=host MASTER_PORT=port] sftkit train ...` reruns itself
under torchrun as ms-swift does (`launch_command`); a process some launcher already started (torchrun,
`deepspeed`, or every rank by SLURM's `srun`) joins the group its environment describes (`process_world`).
CPU runs use gloo, CUDA runs NCCL with one GPU (or one group of GPUs) per rank.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SftkitError

# Seconds torchrun gives its workers to finish the step and save after a stop signal, before it kills them.
SHUTDOWN_TIMEOUT_S = 600
# The file where ranks started by run_launcher write the exit code of a run stopped after saving.
STOP_REPORT_ENV = "SFTKIT_STOP_REPORT"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # ranks on this node (they share its GPUs and its cache)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device_type: str, backend: str | None = None) -> World:
    """Join the process group the launcher describes in the environment; world size 1 without one.

    backend: nccl, gloo or mpi (ms-swift's ddp_backend); default nccl on CUDA, gloo on CPU.
    """
    world, init_method = process_world(os.environ)
    if not world.distributed:
        return World()
    if backend == "nccl" and device_type != "cuda":
        raise SftkitError("ddp_backend nccl needs CUDA GPUs: use gloo on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"), init_method=init_method,
                                rank=world.rank, world_size=world.size)
    return world


def process_world(env: Mapping[str, str]) -> tuple[World, str | None]:
    """(this process's place, how to rendezvous) from the launcher's variables: torchrun's and deepspeed's
    (RANK, WORLD_SIZE, LOCAL_RANK, ...; env:// also finds torchrun's own store), else srun's when it started
    every rank (SLURM_PROCID, ... and the MASTER_ADDR the job script exports)."""
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env:
        size = _number(env, "WORLD_SIZE")
        local_size = _number(env, "LOCAL_WORLD_SIZE", None) or _number(env, "LOCAL_SIZE", None) or size
        return World(_number(env, "RANK"), size, _number(env, "LOCAL_RANK"), local_size), "env://"
    if started_by_srun(env):
        if not env.get("MASTER_ADDR"):
            raise LaunchError("srun started every rank, but MASTER_ADDR is not set: export MASTER_ADDR=$(scontrol show "
                              "hostnames $SLURM_JOB_NODELIST | head -n 1) (and optionally MASTER_PORT) before srun")
        per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", ""))
        world = World(_number(env, "SLURM_PROCID"), _number(env, "SLURM_STEP_NUM_TASKS"), _number(env, "SLURM_LOCALID"),
                      int(per_node.group()) if per_node else 1)
        return world, f"tcp://{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
    return World(), None


def started_by_srun(env: Mapping[str, str]) -> bool:
    """srun ran this command as one task of several (its step variables; an sbatch script alone has none)."""
    return "SLURM_PROCID" in env and _number(env, "SLURM_STEP_NUM_TASKS", 1) > 1


def launch_command(env: Mapping[str, str], argv: list[str]) -> list[str] | None:
    """The torchrun command that reruns `sftkit <argv>` as ms-swift's variables ask, or None to run here.

    NPROC_PER_NODE processes on each of NNODES nodes. With several nodes every node runs the same command with
    its own NODE_RANK, all pointing at node 0 (MASTER_ADDR, MASTER_PORT): torchrun's static rendezvous, or with
    RDZV_BACKEND=c10d its c10d rendezvous at that address (node ranks then assigned by arrival). One node
    without MASTER_PORT picks a free port (--standalone). None when nothing asks for more than one process, or
    when a launcher (torchrun, deepspeed, srun) already started this one.
    """
    if "LOCAL_RANK" in env or started_by_srun(env):
        return None
    nproc, nodes = _number(env, "NPROC_PER_NODE", 1), _number(env, "NNODES", 1)
    if nproc < 1 or nodes < 1:
        raise LaunchError(f"NPROC_PER_NODE and NNODES must be >= 1, got {nproc} and {nodes}")
    if nproc == 1 and nodes == 1:
        return None
    rendezvous = env.get("RDZV_BACKEND") or "static"
    if rendezvous not in ("static", "c10d"):
        raise LaunchError(f"RDZV_BACKEND must be static or c10d, got '{rendezvous}'")
    address, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT") or "29500"
    node_rank = env.get("NODE_RANK") or env.get("SLURM_NODEID")  # one srun task per node: its node index
    if nodes > 1 and not address:
        raise LaunchError(f"NNODES={nodes} needs MASTER_ADDR: the address of node 0, the same on every node")
    if nodes > 1 and rendezvous == "static" and node_rank is None:
        raise LaunchError(f"NNODES={nodes} needs NODE_RANK: 0 on the node at MASTER_ADDR, 1 to {nodes - 1} on the others")
    args = [f"--nproc_per_node={nproc}", f"--nnodes={nodes}"]
    if rendezvous == "c10d":
        args += ["--rdzv_backend=c10d", f"--rdzv_endpoint={address or '127.0.0.1'}:{port}",
                 f"--rdzv_id={env.get('RDZV_ID') or 'sftkit'}"]
    elif nodes == 1 and not env.get("MASTER_PORT"):
        args += ["--standalone"]
    else:
        args += [f"--node_rank={node_rank or 0}", f"--master_addr={address or '127.0.0.1'}", f"--master_port={port}"]
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "sftkit_cli.main", *argv]


def run_launcher(command: list[str]) -> int:
    """Run torchrun to its end, handing it each SIGINT/SIGTERM this process gets; its exit code, or 130/143 when
    the ranks stopped on a signal after saving.

    Dying here would leave torchrun and its workers training (they run in sessions of their own), and a Ctrl-C
    reaching torchrun twice (from the terminal and from here) would abort the workers without saving; so torchrun
    runs in a session of its own and hears each signal once, from here. It passes the signal to the workers,
    which finish their step and save; they get SHUTDOWN_TIMEOUT_S for that unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    says otherwise (torchrun kills them after 30 s by default). torchrun's own code then only says that its
    workers ended early, so the ranks report a saved stop's code in a file (report_stop).
    """
    with tempfile.TemporaryDirectory(prefix="sftkit-launch-") as folder:
        report = os.path.join(folder, "stopped")
        env = {**os.environ, STOP_REPORT_ENV: report}
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
        process = subprocess.Popen(command, env=env, start_new_session=True)
        previous = {sig: signal.signal(sig, lambda signum, frame: process.send_signal(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code and os.path.exists(report):
            with open(report) as handle:
                return int(handle.read())
    return code


def report_stop(exit_code: int) -> None:
    """Tell the `sftkit` that launched this rank (run_launcher) that the run stopped after saving, with this code."""
    path = os.environ.get(STOP_REPORT_ENV)
    if path:
        with open(path, "w") as handle:
            handle.write(str(exit_code))


class LaunchError(SftkitError):
    """The launch variables do not describe a run (missing or malformed NNODES, NODE_RANK, MASTER_ADDR, ...)."""


def _number(env: Mapping[str, str], name: str, default: int | None = 0) -> int | None:
    if not env.get(name):
        return default
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name} must be an integer, got '{env[name]}'") from None


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
    """Leave the group together: a rank that destroys it while another still works (rank 0 writing the run's
    last files) can leave that one waiting on it (pytorch/pytorch#75097), so every rank meets first."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

