"""Which sequences a step trains on: recomputable from the step alone, so a resumed run and a run
on N processes see exactly the batches of one uninterrupted process."""

from __future__ import annotations

import torch


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Sequence indices of a step: epochs of seeded permutations, so any step can be recomputed."""
    flat = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = flat // n, flat % n
    out = torch.empty_like(flat)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out


def rank_share(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous 1/world of a global batch (the caller checks divisibility)."""
    per = len(indices) // world
    return indices[rank * per : (rank + 1) * per]
