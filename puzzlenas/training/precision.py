"""The autocast policy of training: bf16 only where the device executes it natively."""

from __future__ import annotations

import contextlib

import torch

from ..utils import autocast_dtype


def autocast(choice: str, device: torch.device):
    """A factory of autocast contexts for `choice` ("auto", "float32", "bfloat16") on `device`:
    bf16 autocast where autocast_dtype picks it (measured once on CPUs), else plain fp32."""
    dtype = autocast_dtype(choice, device)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["autocast", "autocast_dtype"]
