"""The torchrun process group: joined once per command, left at its end.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK and the rendezvous; one node or many (README:
"Multi-node with torchrun"). gloo on CPU, NCCL on GPU (each process on its LOCAL_RANK device).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Join the torchrun group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def reduce_int(value: int, op: str) -> int:
    """Collective: the "min" or "max" of an int over all ranks (itself on one process)."""
    if not is_distributed():
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(t.item())
