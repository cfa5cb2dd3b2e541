"""Process-group setup for every way `train.py` is started: plain `python`, `torchrun`, or the `deepspeed` launcher.

The training loop always runs on a DeepSpeed engine, which needs an initialised process group even for a single
process. Launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python train.py` does
not, and DeepSpeed would then try MPI discovery (mpi4py). We fill in a one-process world instead.
"""
from __future__ import annotations

import atexit
import importlib
import os
import socket
from dataclasses import dataclass
from typing import Tuple

import torch

from factory.errors import FactoryError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Launchers describe the world in these variables; a plain `python train.py` describes a one-process world itself.
WORLD_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Set next to the variables we filled ourselves, so that a child process (a script that runs training in-process and
# then starts train.py) does not mistake them for a launcher's and try to listen on the port its parent holds.
SELF_DESCRIBED = "FACTORY_SELF_DESCRIBED_WORLD"


def launcher_world() -> Tuple[int, int]:
    """(rank, world_size) as a launcher describes them (torchrun / deepspeed set RANK and WORLD_SIZE; none: (0, 1)),
    for work that shards by rank without a process group (eval.py's question shards)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise FactoryError(f"RANK={rank} is not within WORLD_SIZE={world}; launch with torchrun or unset both.")
    return rank, world


def fill_single_process_env() -> None:
    """Describe a one-process world in the environment when no launcher did (launcher values are never touched)."""
    inherited = os.environ.pop(SELF_DESCRIBED, None) == "1"
    # Variables that came with our marker are a parent's self-described world: drop them, unless a launcher started
    # this process since (torchrun's workers carry TORCHELASTIC_RUN_ID and must reach torchrun's store at its port;
    # a multi-process world is never one we described).
    if inherited and os.environ.get("WORLD_SIZE", "1") == "1" and "TORCHELASTIC_RUN_ID" not in os.environ:
        for key in WORLD_VARIABLES:
            os.environ.pop(key, None)
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", SELF_DESCRIBED: "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


def _skip_deepspeed_shm_comm_build() -> None:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op the first time a process group is created
    # (40-70 s on a fresh machine) and falls back to plain gloo collectives when the op is unavailable. We always
    # want that fallback, so we make the builder report "unavailable". This is the project's only patch of a
    # third-party attribute; `import deepspeed.comm.torch as m` would resolve to the torch package re-exported by
    # deepspeed.comm, hence importlib.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU) and return this process's place."""
    import deepspeed  # heavy (seconds to import): only a training process initialises the process group

    fill_single_process_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        _skip_deepspeed_shm_comm_build()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        atexit.register(destroy)
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place, returned for convenience); a no-op in a one-process world."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
    return value


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (e.g. a decision only rank 0 can take)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
