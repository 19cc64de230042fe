"""AdamW with linear warm-up then cosine decay, from the `optim` section BLD and GKD share."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def lr_at(step: int, total: int, optim) -> float:
    """Linear warm-up over warmup_fraction of the steps, then cosine decay to min_lr_fraction * lr."""
    warmup = int(optim.warmup_fraction * total)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return optim.lr * (optim.min_lr_fraction + (1 - optim.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(params: Iterable[torch.nn.Parameter] | Iterable[dict], optim) -> torch.optim.AdamW:
    """AdamW over parameters or parameter groups; a group's "lr_scale" (default 1) scales the
    learning rate that optimizer_step sets."""
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer, params, lr: float, grad_clip: float) -> None:
    """Clip (0: off), set this step's learning rate (times each group's lr_scale), step, free the gradients.

    Works for FSDP2 parameters too: clip_grad_norm_ on DTensors reduces the norm over all shards."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(params), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
