"""Training plumbing shared by BLD and GKD (torchtune's `training/`): one copy of each piece.

    optim.py        AdamW from an `OptimConfig`, warm-up + cosine learning rate, clipped step
    distributed.py  torchrun group set-up and teardown, rank/world, barrier, min/max over ranks
    precision.py    the autocast policy: bf16 only where the device runs it natively
    batches.py      seeded batch indices any step can recompute, a rank's share of a batch
    state.py        resume states: one atomic file per process, or sharded (DCP) folders
    fsdp.py         FSDP2 wrapping, activation checkpointing, the full state dict back
"""

from .batches import batch_indices, rank_share
from .distributed import barrier, init_distributed, is_distributed, rank_world, reduce_int, teardown
from .optim import adamw, lr_at, optimizer_step
from .precision import autocast, autocast_dtype
from .state import load_state, save_state

__all__ = [
    "adamw", "lr_at", "optimizer_step", "init_distributed", "teardown", "rank_world", "reduce_int", "barrier", "is_distributed",
    "autocast", "autocast_dtype", "batch_indices", "rank_share", "load_state", "save_state",
]
