"""FSDP2 (torch.distributed.fsdp.fully_shard) for a DeciLM model, activation checkpointing, and
the full state dict back from the shards.

Each decoder layer is its own FSDP unit (all-gathered just before it runs, freed after), the root
holds the embeddings, final norm and head. bf16 mixed precision keeps fp32 master weights and
reduces gradients in fp32.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    from .distributed import rank_world

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (rank_world()[1],))


def shard(model: torch.nn.Module, param_dtype: torch.dtype | None = None, device_mesh=None,
          offload: bool = False) -> torch.nn.Module:
    """Shard `model` in place over all ranks (per decoder layer + root); returns it. `offload`: the
    fp32 shards, their grads and the optimizer state live in host RAM (FSDP2 CPUOffloadPolicy);
    each layer is copied to the device for its forward and backward only."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device_mesh = device_mesh or mesh()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    # pinned host memory needs an accelerator (and only speeds up copies to one)
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=device_mesh, mp_policy=mp, offload_policy=policy)
    fully_shard(model, mesh=device_mesh, mp_policy=mp, offload_policy=policy)
    return model


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    The layer's own forward is wrapped (not the module), so state-dict keys stay the same."""
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole model's weights on CPU, on every rank (all-gathered from the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
