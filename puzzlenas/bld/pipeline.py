"""BLD with the parent's layers split over the torchrun ranks (`bld.parallel: layers`).

    torchrun --nproc-per-node 2 -m puzzlenas bld CONFIG --workdir W --set bld.parallel=layers

Rank r keeps only its contiguous range of the parent's decoder layers (under torchrun it reads
only those from the parent's safetensors files, parent_part; a parent loaded whole drops the
others before it moves to the device), receives the residual stream entering its first layer
from rank r-1, runs its layers (handing each layer's alternatives their inputs and targets, as
one process does) and sends the stream leaving its last layer to rank r+1. The parent is frozen,
so what a rank receives does not depend on what the others train: every alternative sees exactly
the tensors it sees in one process, and trains to the same block.

All ranks run the same passes over the same batches in the same order (calibration, validation,
every training step), a rank with nothing left to train only relaying, so no rank ever waits on
a pass that another skipped.

Scoring with the parent split the same way (`score.parallel: layers`) uses this class too:
score/pipeline.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from ..checkpoint.io import NotLoaded, ParentPart
from ..errors import PuzzleError
from ..library.init import trace_parent
from ..training import rank_world


def layer_bounds(n: int, rank: int, world: int, setting: str = "bld.parallel=layers") -> tuple[int, int]:
    """Rank `rank`'s contiguous range lo..hi-1 of a parent's `n` layers split over `world` ranks."""
    if world > n:
        raise PuzzleError(f"{setting}: {world} torchrun processes for a parent of {n} layers; use at most {n}")
    bounds = [round(n * i / world) for i in range(world + 1)]
    return bounds[rank], bounds[rank + 1]


def parent_part(config, rank: int, world: int, setting: str, head: bool) -> ParentPart:
    """The tensors rank `rank` reads of a parent (DeciLMConfig `config`) split over `world` ranks:
    its layers, the embedding on the first rank (the only one that embeds tokens), and with `head`
    (scoring compares logits; BLD never makes any) the final norm and LM head on the last."""
    lo, hi = layer_bounds(config.num_hidden_layers, rank, world, setting)
    return ParentPart(lo, hi, embedding=rank == 0, head=head and rank == world - 1)


class LayerPipeline:
    """This rank's share of the parent's layers, and the tracer that passes activations on.

    Called like library.init.trace_parent(parent, ids, layers): yields the requested layers
    among this rank's, after receiving the stream from the previous rank; sends it on at the end."""

    relays = True  # callers run it even with nothing to train: the other ranks wait on it

    def __init__(self, parent, rank: int | None = None, world: int | None = None,
                 setting: str = "bld.parallel=layers"):
        r, w = rank_world()
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.lo, self.hi = layer_bounds(parent.config.num_hidden_layers, self.rank, self.world, setting)
        self.dtype = next(parent.parameters()).dtype  # a parent read in part may lack the embedding

    def owns(self, layer: int) -> bool:
        return self.lo <= layer < self.hi

    def drop_others(self, parent) -> None:
        """Free the layers other ranks hold (call before moving the parent to the device)."""
        for i in range(len(parent.model.layers)):
            if not self.owns(i):
                parent.model.layers[i] = NotLoaded(f"layer {i}")

    def recv(self, parent, input_ids: torch.Tensor) -> torch.Tensor:
        """The (B, T, C) residual stream rank-1 sends for the sequences `input_ids` (B, T)."""
        B, T = input_ids.shape
        h = torch.empty(B, T, parent.config.hidden_size, dtype=self.dtype, device=input_ids.device)  # (B, T, C)
        dist.recv(h, self.rank - 1)
        return h

    def send(self, h: torch.Tensor) -> None:
        """Hand the stream `h` (B, T, C) to rank+1."""
        dist.send(h.detach().to(self.dtype).contiguous(), self.rank + 1)

    def __call__(self, parent, input_ids: torch.Tensor, layers: set[int]):
        model = parent.model
        if self.rank == 0:
            embed = model.embed_tokens
        else:
            h = self.recv(parent, input_ids)
            embed = lambda _ids: h  # noqa: E731  the stream received stands in for the embeddings
        view = SimpleNamespace(model=SimpleNamespace(embed_tokens=embed, rotary_emb=model.rotary_emb,
                                                     layers=model.layers[: self.hi]))
        out = None
        for i, a_in, a_out, f_in, f_out, pe in trace_parent(view, input_ids, set(range(self.lo, self.hi))):
            if i in layers:
                yield i, a_in, a_out, f_in, f_out, pe
            out = f_in + f_out  # the stream leaving layer i
        if self.rank < self.world - 1:
            self.send(out)
