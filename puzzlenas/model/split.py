"""Models whose decoder layers are split over the torchrun ranks, driven from rank 0 as ordinary causal LMs.

    torchrun --nproc-per-node 8 -m puzzlenas run CONFIG --workdir W --only data --set data.parallel=layers
    torchrun --nproc-per-node 8 -m puzzlenas run CONFIG --workdir W --only eval --set eval.parallel=layers

Why a facade on rank 0 rather than split versions of the stages: the parent writes its own
distillation text (data.generate_sequences) and is evaluated (perplexity, KL, lm-eval's HFLM, which
takes the model object) by code that only calls `model(ids, attention_mask=..., cache=..., use_cache=...)`
and reads `.logits`. Rank 0 hands that code a SplitLM that looks like the causal LM; the split lives
in this file alone, and the stages run unchanged, so they cannot drift from their one-process form.

Each rank keeps a contiguous range of a model's layers, as bld.pipeline.LayerPipeline deals them
(for the parent, model 0: rank 0 the first layers and the embedding, the last rank the last
layers, the final norm and the LM head; model k's pipeline starts on rank k mod N, see _place).
Ranks > 0 run `serve()` until rank 0 calls `stop()`. One call of a SplitLM:
  1. rank 0 broadcasts a header (command, model, B, T, past length, mask length, cache use, logits kept)
     and the (B, past + T) attention mask when there is one
  2. the rank where the pipeline starts embeds the ids (rank 0 sends them there) and runs its
     layers; each next rank receives the (B, T, C) residual stream from the one before, runs its
     layers (with the positions and mask one process builds) and sends it on
  3. the last applies the final norm and LM head and sends the (B, T, V) logits to rank 0
The tensors are those one process computes, layer for layer: in fp32 the logits are equal bit
for bit (tests/test_split.py). Decoding: every rank keeps the KV cache of its own layers
(DeciLM's cache_index is the layer's place among all attention layers, so a rank's cache simply
leaves the others' slots empty); rank 0 gets a SplitCache handle that stands for all of them.

Rank 0 may spend hours between two calls (tokenizing, lm-eval's task set-up), so the messages go
over a process group of their own with a long timeout, not the default group's 30 minutes. A
failure on rank 0 still ends the servers: its `stop()` runs in a `finally` (unless the failure
came half-way through a call), and torchrun ends the other workers of a failed one.

What a SplitLM does not do: transformers' `generate()` (so lm-eval tasks that generate text, none
of the shipped ones), `position_ids`, `inputs_embeds`, `labels` (a TypeError names them), and
more than one KV cache per model at a time.

The split saves device memory only: each rank reads the whole model into host RAM (as the
checkpoint loader gives it) before dropping the layers it does not hold.
"""

from __future__ import annotations

import datetime
import logging
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from transformers.cache_utils import DynamicCache

from .modeling_decilm import build_attention_mask

log = logging.getLogger(__name__)

# header fields, one int64 each
_CMD, _MODEL, _B, _T, _PAST, _MASK, _CACHE, _KEEP = range(8)
_FORWARD, _LOAD, _FREE, _STOP = range(4)
# cache use: none; a fresh cache (the first step of a generation); the model's current cache
_NO_CACHE, _NEW_CACHE, _GO_ON = range(3)
TIMEOUT = datetime.timedelta(days=7)  # rank 0 between two calls, see module doc


class SplitCache:
    """Rank 0's handle on one generation's KV caches, which live on every rank (its own layers')."""

    def __init__(self, model_id: int, generation: int):
        self.model_id, self.generation, self.length = model_id, generation, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class _Part:
    """One model's share on this rank: its layers [lo, hi), the embedding where its pipeline starts
    (rank `first`), the final norm and LM head where it ends (rank `last`), and the KV cache of the
    generation going on."""

    def __init__(self, model, lo: int, hi: int, first: int, last: int, rank: int):
        inner = model.model
        self.config = model.config
        self.lo, self.hi, self.first_rank, self.last_rank = lo, hi, first, last
        first, last = rank == first, rank == last
        self.embed = inner.embed_tokens if first else None
        self.layers = inner.layers
        self.rotary = inner.rotary_emb
        self.norm, self.lm_head = (inner.norm, model.lm_head) if last else (None, None)
        self.dtype = inner.norm.weight.dtype  # the stream's and the logits' dtype (every rank keeps the norm)
        self.cache, self.generation = None, 0
        self.given = None  # rank 0: (the caller's Cache object, the SplitCache it stands for)
        self.model = model  # what holds the tensors: freed with the part


class SplitLM(nn.Module):
    """Rank 0's view of a split model: called like DeciLMForCausalLM, computed by all the ranks.

    Its parameters are rank 0's share (its layers, the norm, an embedding or LM head), so
    `next(model.parameters()).device` is rank 0's device, as callers expect; `num_parameters()` is
    the whole model's count."""

    def __init__(self, split: LayerSplit, model_id: int, model, total_params: int):
        super().__init__()
        self._split, self._id, self._total = split, model_id, total_params
        self.split_ranks = split.world  # the ranks that compute it (eval times such models split: eval.measure_speed)
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.share = model  # registered: rank 0's parameters (the layers other ranks hold are NotLoaded)

    @property
    def device(self) -> torch.device:
        return self._split.device

    @property
    def dtype(self) -> torch.dtype:
        return self._split.parts[self._id].dtype

    def num_parameters(self, *args, **kwargs) -> int:
        return self._total

    def tie_weights(self, *args, **kwargs):  # lm-eval calls it on the model it is given: weights are loaded
        return None

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, logits_to_keep: int = 0,
                past_key_values=None, return_dict=None, **unsupported):
        rest = {k: v for k, v in unsupported.items() if v is not None and k != "output_hidden_states"}
        if rest:
            raise TypeError(f"a model split over ranks takes input_ids, attention_mask, cache/use_cache and "
                            f"logits_to_keep; not {', '.join(rest)}")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        logits, handle = self._split.forward(self._id, input_ids, attention_mask, cache if use_cache else None,
                                             bool(use_cache), logits_to_keep)
        return SimpleNamespace(logits=logits, cache=handle, past_key_values=handle)


class LayerSplit:
    """The ranks' shared state: the models loaded on every rank, the messages between them.

    Every rank creates it at the same point (the process group is made collectively). Rank 0 then
    calls share()/load() and the SplitLMs; the other ranks call serve(), which returns after
    rank 0's stop(). `loader(key)` loads the model rank 0 names by `key` (on ranks > 0)."""

    def __init__(self, loader, setting: str = "layers"):
        from ..utils import pick_device

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = pick_device()
        self.loader, self.setting = loader, setting
        self.group = dist.new_group(timeout=TIMEOUT)
        self.parts: dict[int, _Part] = {}
        self._next_id = 0
        self._busy = False  # rank 0 inside a call the other ranks take part in

    # --- rank 0 --------------------------------------------------------------------------------

    def share(self, model, key: str) -> SplitLM:
        """Split `model` (rank 0's copy, on the CPU) over the ranks; the others load `key`. Rank 0's
        copy loses the layers it does not hold."""
        model_id = self._next_id
        self._busy = True
        self._send_header(_LOAD, model_id)
        dist.broadcast_object_list([key], 0, group=self.group)
        total = self._place(model_id, model)
        self._busy = False
        return SplitLM(self, model_id, model, total)

    def load(self, key: str) -> SplitLM:
        """The model `loader(key)` gives, loaded and split over the ranks."""
        return self.share(self.loader(key), key)

    def free(self, model: SplitLM) -> None:
        """Drop `model` on every rank (its memory back to the device)."""
        self._send_header(_FREE, model._id)
        self.parts.pop(model._id)

    def stop(self) -> None:
        """Let the servers return (call once, last). Not after a call that failed half-way: the
        others wait inside it, and torchrun ends them when rank 0 exits with the error."""
        if not self._busy:
            self._send_header(_STOP, 0)

    def forward(self, model_id: int, ids: torch.Tensor, attention_mask, cache, use_cache: bool, keep: int):
        part = self.parts[model_id]
        B, T = ids.shape
        given = None
        if cache is not None and not isinstance(cache, SplitCache):
            # the caller's own Cache object, passed again at every step (engines/torch_engine.py times
            # so): an empty one starts a generation, and stands for its SplitCache from then on
            given = cache
            if part.given is not None and part.given[0] is cache:
                cache = part.given[1]
            elif cache.get_seq_length() == 0:
                cache = None
            else:
                raise TypeError(f"a model split over ranks cannot go on from a filled {type(cache).__name__}")
        if cache is not None and (cache.model_id != model_id or cache.generation != part.generation):
            raise RuntimeError("a model split over ranks keeps one KV cache at a time: this one has been replaced")
        mode = _GO_ON if cache is not None else _NEW_CACHE if use_cache else _NO_CACHE
        past = cache.length if cache is not None else 0
        mask = None if attention_mask is None else attention_mask.to(self.device, torch.long)
        self._busy = True
        header = self._send_header(_FORWARD, model_id, B, T, past, 0 if mask is None else mask.shape[1], mode, keep)
        if mask is not None:
            dist.broadcast(mask.contiguous(), 0, group=self.group)
        logits = self._run(part, header, ids.to(self.device), mask)
        self._busy = False
        if mode == _NEW_CACHE:
            cache = SplitCache(model_id, part.generation)
            part.given = (given, cache) if given is not None else None
        if cache is not None:
            cache.length = past + T
        return logits, cache

    def _send_header(self, command: int, model_id: int, B=0, T=0, past=0, mask=0, cache=_NO_CACHE, keep=0):
        header = torch.tensor([command, model_id, B, T, past, mask, cache, keep], dtype=torch.long, device=self.device)
        dist.broadcast(header, 0, group=self.group)
        return header.tolist()

    # --- every rank ------------------------------------------------------------------------------

    def _place(self, model_id: int, model) -> int:
        """Keep this rank's share of `model` on the device; the whole model's parameter count.

        Model k's pipeline starts on rank k mod N and goes round the ranks: the embeddings and LM
        heads of the models eval holds together (the parent and four children) spread over the
        ranks instead of all landing on the first and the last (a 70B parent on 8 x 80 GiB:
        67.9 GiB on the fullest rank instead of 73.6, `puzzlenas plan`)."""
        from ..bld.pipeline import LayerPipeline

        total = sum(p.numel() for p in model.parameters())
        place = (self.rank - model_id) % self.world  # this rank's place in the model's pipeline
        pipeline = LayerPipeline(model, place, self.world, setting=self.setting)
        pipeline.drop_others(model)
        first, last = place == 0, place == self.world - 1
        if not first:
            model.model.embed_tokens = None
        if not last:
            model.lm_head = None  # tied: the one matrix stays where the embedding is used
        model.to(self.device)
        self.parts[model_id] = _Part(model, pipeline.lo, pipeline.hi, model_id % self.world,
                                     (model_id - 1) % self.world, self.rank)
        self._next_id = model_id + 1
        log.info("%s: rank %d holds layers %d-%d%s%s of model %d: %.2fM of its %.2fM parameters", self.setting,
                 self.rank, pipeline.lo, pipeline.hi - 1, " + embedding" * first, " + LM head" * last, model_id,
                 sum(p.numel() for p in model.parameters()) / 1e6, total / 1e6)
        return total

    @torch.no_grad()
    def _run(self, part: _Part, header: list[int], ids: torch.Tensor | None, mask: torch.Tensor | None):
        """This rank's layers for one call; the logits on rank 0, None elsewhere."""
        B, T, past, mode, keep = header[_B], header[_T], header[_PAST], header[_CACHE], header[_KEEP]
        if mode == _NEW_CACHE:
            part.cache, part.generation = DynamicCache(), part.generation + 1
        cache = part.cache if mode != _NO_CACHE else None
        if part.first_rank != 0 and self.rank in (0, part.first_rank):  # the ids to where the pipeline starts
            if self.rank == 0:
                dist.send(ids.contiguous(), part.first_rank, group=self.group)
            else:
                ids = torch.empty(B, T, dtype=torch.long, device=self.device)
                dist.recv(ids, 0, group=self.group)
        if self.rank == part.first_rank:
            h = part.embed(ids)  # (B, T, C)
        else:
            h = torch.empty(B, T, part.config.hidden_size, dtype=part.dtype, device=self.device)
            dist.recv(h, (self.rank - 1) % self.world, group=self.group)
        # what DeciLMModel.forward builds: positions after the past, the additive mask, RoPE tables
        positions = torch.arange(past, past + T, device=h.device)[None].expand(B, -1)
        additive = build_attention_mask(mask, T, past, h.dtype, h.device)
        pe = part.rotary(h, positions)
        for layer in part.layers[part.lo : part.hi]:
            h = layer(h, pe, additive, cache)
        if self.rank != part.last_rank:
            dist.send(h.contiguous(), (self.rank + 1) % self.world, group=self.group)
        else:
            h = part.norm(h)
            logits = part.lm_head(h[:, -keep:] if keep else h)  # (B, T or keep, V)
            if self.rank == 0:
                return logits
            dist.send(logits.contiguous(), 0, group=self.group)
        if self.rank > 0:
            return None
        logits = torch.empty(B, keep or T, part.config.vocab_size, dtype=part.dtype, device=self.device)
        dist.recv(logits, part.last_rank, group=self.group)
        return logits

    def serve(self) -> None:
        """Ranks > 0: do what rank 0 asks until it stops."""
        header = torch.empty(8, dtype=torch.long, device=self.device)
        while True:
            dist.broadcast(header, 0, group=self.group)
            h = header.tolist()
            if h[_CMD] == _STOP:
                return
            if h[_CMD] == _LOAD:
                key = [None]
                dist.broadcast_object_list(key, 0, group=self.group)
                self._place(h[_MODEL], self.loader(key[0]))
            elif h[_CMD] == _FREE:
                self.parts.pop(h[_MODEL])
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                mask = None
                if h[_MASK]:
                    mask = torch.empty(h[_B], h[_MASK], dtype=torch.long, device=self.device)
                    dist.broadcast(mask, 0, group=self.group)
                self._run(self.parts[h[_MODEL]], h, None, mask)
