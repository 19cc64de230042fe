"""Scoring under torchrun: the alternatives dealt over the ranks, or the parent's layers split over them.

    torchrun --nproc-per-node 2 -m puzzlenas score CONFIG --workdir W --set score.parallel=layers

`score.parallel: alternatives` (the default): every rank holds the whole parent and scores every
world-th alternative (score_alternatives); gather_scores merges them on every rank.

`score.parallel: layers` (a parent too big for one device): rank r keeps only its contiguous range
of the parent's decoder layers (bld.pipeline.LayerPipeline, as BLD's layer split), the first
rank the embedding, the last the final norm and LM head. Per batch:
  1. the parent's own stream goes rank to rank once; each rank keeps the stream entering the
     attention and the FFN of each of its layers (B, T, C); the last rank makes the parent's
     log-probs from the stream leaving layer N-1
  2. for every alternative, in layer order: the rank holding its layer puts it in place of the
     parent's block, runs the rest of its own layers and sends the damaged stream on; each later
     rank runs all its layers on it and sends it on; the last rank compares the logits with the
     parent's and adds the alternative's sums
Every rank walks the alternatives in the same order, so each send meets its receive, and a rank
computes the next damaged stream while the later ones carry the last. The last rank broadcasts
the sums. The tensors are those one process computes, layer for layer, so in fp32 the scores
equal one process's bit for bit (tests/test_distributed.py).

A killed run resumes from the last rank's state file (resume.py: it holds the sums): that rank
broadcasts the position reached and every rank skips the same alternatives.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bld.pipeline import LayerPipeline
from ..library.space import Alternative
from ..library.store import Library
from ..training import rank_world
from ..utils import pick_device
from .replace import compare_logits, leave_layer, load_blocks, run_tail, to_run
from .resume import ScoreProgress

log = logging.getLogger(__name__)

_SUMS = ("kl", "nll", "agree", "n")


def place_parent(cfg, parent) -> LayerPipeline | None:
    """Under torchrun, move `parent` (on the CPU) to this rank's device; with score.parallel=layers
    first drop what other ranks hold and return this rank's LayerPipeline. One process: nothing."""
    rank, world = rank_world()
    if world == 1:
        return None
    pipeline = None
    if cfg.score.parallel == "layers":
        pipeline = LayerPipeline(parent, setting="score.parallel=layers")
        loaded = getattr(parent, "loaded_part", None)  # read in part (cli: bld.pipeline.parent_part): nothing to drop
        total = loaded.whole_params if loaded else sum(p.numel() for p in parent.parameters())
        # before the move: the device holds this rank's layers only, the embedding only on the
        # first rank, the LM head only on the last (tied, the one matrix stays where either is used)
        pipeline.drop_others(parent)
        if rank > 0:
            parent.model.embed_tokens = None
        if rank < world - 1:
            parent.lm_head = None
        log.info("score.parallel=layers: rank %d holds layers %d-%d%s%s: %s of the parent's %s parameters",
                 rank, pipeline.lo, pipeline.hi - 1, " + embedding" * (rank == 0), " + LM head" * (rank == world - 1),
                 f"{sum(p.numel() for p in parent.parameters()):,}", f"{total:,}")
    parent.to(pick_device())
    return pipeline


def gather_scores(mine: dict[str, dict], alternatives: list[Alternative]) -> dict[str, dict]:
    """Every rank's metrics of its share of `alternatives` (score.parallel=alternatives), merged in
    the order of `alternatives`, on every rank. One process: its own, in that order."""
    parts = [mine]
    if rank_world()[1] > 1:
        parts = [{} for _ in range(rank_world()[1])]
        dist.all_gather_object(parts, mine)
    merged = {name: m for part in parts for name, m in part.items()}
    return {a.name: merged[a.name] for a in alternatives}


@torch.no_grad()
def score_split(parent, library: Library, alternatives: list[Alternative], ids: torch.Tensor, batch_size: int,
                pipeline: LayerPipeline, progress: bool = True, state: ScoreProgress | None = None
                ) -> tuple[dict, float, int]:
    """score_alternatives' sums with the parent's layers split over the ranks (module doc): per
    alternative run {kl, nll, agree, n}, the parent's NLL and the token count, for score.summarize.
    Every rank calls it with the same arguments and gets the same sums; the last shows the progress.
    `state` (resume.py): on the last rank, where a killed run's sums stop; all ranks walk on from there."""
    device = next(parent.parameters()).device
    last = pipeline.world - 1
    todo = sorted(to_run(alternatives, parent.config), key=lambda a: a.layer)  # the order every rank walks
    blocks = load_blocks(parent, library, [a for a in todo if pipeline.owns(a.layer)])
    here = [a for a in todo if a.layer < pipeline.hi]  # this rank's and those its stream comes from: todo's start
    totals = {a: dict.fromkeys(_SUMS, 0) for a in todo}
    batches = (len(ids) + batch_size - 1) // batch_size
    state = state or ScoreProgress()
    state.begin(todo, totals, batch_size, batches)  # the last rank takes up its state file, if any
    start = torch.tensor(state.start, dtype=torch.int64, device=device)
    dist.broadcast(start, last)
    state.start_at(*start.tolist())
    parent_nll, n_tokens = state.parent_nll, state.n_tokens
    bar = tqdm(total=len(todo) * batches, initial=state.position(), desc="scoring", unit="alt",
               disable=not progress or pipeline.rank != last, dynamic_ncols=True)
    for b in range(state.batch, batches):
        batch = ids[b * batch_size : (b + 1) * batch_size].to(device)
        labels = batch[:, 1:].flatten()
        entering = {}  # layer -> (residual entering attention, entering FFN), this rank's layers
        for i, a_in, _, f_in, f_out, pe_i in pipeline(parent, batch, set(range(pipeline.lo, pipeline.hi))):
            entering[i], pe = (a_in, f_in), pe_i
            h = f_in + f_out  # leaving layer i; the parent's output after the last rank's last layer
        if pipeline.rank == last:
            parent_logits = parent.lm_head(parent.model.norm(h))[:, :-1].flatten(0, 1)
            parent_logp = F.log_softmax(parent_logits.float(), dim=-1)
            if not state.parent_counted(b):
                parent_nll += F.nll_loss(parent_logp, labels, reduction="sum").item()
                n_tokens += labels.numel()
        for j, a in enumerate(here):
            if state.skips(b, j):  # every rank skips the same ones: each send still meets its receive
                continue
            if pipeline.owns(a.layer):
                h_attn, h_ffn = entering[a.layer]
                h2 = leave_layer(parent.model.layers[a.layer], a, blocks.get(a), h_attn, h_ffn, pe)
                first = a.layer + 1
            else:  # damaged upstream
                h2, first = pipeline.recv(parent, batch), pipeline.lo
            if pipeline.rank < last:
                for layer in parent.model.layers[first : pipeline.hi]:
                    h2 = layer(h2, pe)
                pipeline.send(h2)
                continue
            logits = run_tail(parent, h2, first, pe)[:, :-1].flatten(0, 1)
            m = compare_logits(parent_logp, logits, labels)
            for k in _SUMS:
                totals[a][k] += m[k]
            bar.update(1)
            state.advance(b, j, parent_nll, n_tokens)
    bar.close()
    # the sums live on the last rank: broadcast them (float64 holds the Python floats and the counts exactly)
    sums = torch.tensor([[totals[a][k] for k in _SUMS] for a in todo] + [[parent_nll, n_tokens, 0, 0]],
                        dtype=torch.float64, device=device)
    dist.broadcast(sums, last)
    rows = sums.tolist()
    totals = {a: {"kl": r[0], "nll": r[1], "agree": int(r[2]), "n": int(r[3])} for a, r in zip(todo, rows)}
    return totals, rows[-1][0], int(rows[-1][1])
