"""Replace-1-block scoring: how much each alternative, alone in the otherwise intact parent, hurts.

For every alternative at layer i (no-op included) on held-out tokens:
  kl          mean over tokens of KL(parent || child) of the next-token distributions
  lm_loss     the child's next-token cross-entropy; lm_loss_delta = lm_loss - parent's
  agreement   fraction of tokens whose top-1 prediction equals the parent's

The hidden state entering layer i is the parent's for every alternative of layer i, so it is
computed once per batch and only layers i..N run per alternative. Parent alternatives score 0 by
definition and are not run.

Output: scores/replace1.json = {library fingerprint, metric settings, per-alternative metrics}, a
workdir.ScoreSet.

Under torchrun `score.parallel` deals the alternatives over the ranks, or splits the parent's
layers over them (pipeline.py); the scores are the same.

A killed run resumes where it stopped, inside a batch too, with the same result (resume.py):
scores/replace1.partial/ holds the sums so far until replace1.json is written.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import PuzzleError
from ..library.init import trace_parent
from ..library.space import Alternative, enumerate_pairs, target_alternatives
from ..library.store import Library
from ..training import barrier, rank_world
from ..utils import fingerprint
from ..workdir import SCORES, ScoreSet, read_scores, write_scores
from .pipeline import gather_scores, place_parent, score_split
from .replace import compare_logits, leave_layer, load_blocks, mean_metrics, run_tail, to_run
from .resume import ScoreProgress, clear_partial

log = logging.getLogger(__name__)


def damage(metrics: dict, metric: str) -> float:
    """The quantity the search minimizes (0 for the parent's own block)."""
    if metric == "kl":
        return metrics["kl"]
    if metric == "lm_loss":
        return metrics["lm_loss_delta"]
    if metric == "agreement":
        return 1.0 - metrics["agreement"]
    raise PuzzleError(f"unknown scoring metric {metric!r} (accepted: kl, lm_loss, agreement)")


@torch.no_grad()
def score_alternatives(parent, library: Library | None, alternatives: list[Alternative], ids: torch.Tensor,
                       batch_size: int = 4, progress: bool = True, state: ScoreProgress | None = None) -> dict[str, dict]:
    """Replace-1-block metrics for `alternatives` on token sequences `ids` (N, T). `state`: where a
    killed run got to (resume.py), taken up and kept up to date."""
    device = next(parent.parameters()).device
    todo = to_run(alternatives, parent.config)
    blocks = load_blocks(parent, library, todo)
    totals = {a: {"kl": 0.0, "nll": 0.0, "agree": 0, "n": 0} for a in todo}
    by_layer: dict[int, list[Alternative]] = {}
    for a in todo:
        by_layer.setdefault(a.layer, []).append(a)
    order = [a for _, alts in sorted(by_layer.items()) for a in alts]  # the walk in every batch
    batches = (len(ids) + batch_size - 1) // batch_size
    state = state or ScoreProgress()
    state.begin(order, totals, batch_size, batches)
    parent_nll, n_tokens = state.parent_nll, state.n_tokens
    bar = tqdm(total=len(order) * batches, initial=state.position(), desc="scoring", unit="alt",
               disable=not progress, dynamic_ncols=True)
    for b in range(state.batch, batches):
        batch = ids[b * batch_size : (b + 1) * batch_size].to(device)
        labels = batch[:, 1:].flatten()
        model = parent.model
        traced = list(trace_parent(parent, batch))
        # (residual entering attention, entering FFN) per layer: the shared prefix
        entering = [(a_in, f_in) for _, a_in, _, f_in, _, _ in traced]
        _, _, _, last_in, last_out, pe = traced[-1]
        h = last_in + last_out  # leaving the last layer
        parent_logits = parent.lm_head(model.norm(h))[:, :-1].flatten(0, 1)
        parent_logp = F.log_softmax(parent_logits.float(), dim=-1)
        if not state.parent_counted(b):
            parent_nll += F.nll_loss(parent_logp, labels, reduction="sum").item()
            n_tokens += labels.numel()
        for j, a in enumerate(order):
            if state.skips(b, j):
                continue
            h_attn, h_ffn = entering[a.layer]
            h2 = leave_layer(model.layers[a.layer], a, blocks.get(a), h_attn, h_ffn, pe)
            logits = run_tail(parent, h2, a.layer + 1, pe)[:, :-1].flatten(0, 1)
            m = compare_logits(parent_logp, logits, labels)
            for k in totals[a]:
                totals[a][k] += m[k]
            bar.update(1)
            state.advance(b, j, parent_nll, n_tokens)
    bar.close()
    return summarize(alternatives, totals, parent_nll, n_tokens)


def summarize(alternatives: list[Alternative], totals: dict, parent_nll: float, n_tokens: int) -> dict[str, dict]:
    """Per-alternative metrics from the sums over all tokens (`totals` of the alternatives run)."""
    parent_loss = parent_nll / n_tokens
    out = {}
    for a in alternatives:
        if a in totals:
            out[a.name] = mean_metrics(totals[a], parent_loss)
        else:
            out[a.name] = {"kl": 0.0, "lm_loss": parent_loss, "lm_loss_delta": 0.0, "agreement": 1.0}
    return out


def library_fingerprint(library: Library) -> str:
    records = {k: {f: v.get(f) for f in ("tokens", "val_nmse", "file")} for k, v in library.records().items()}
    return fingerprint(library.parent_fingerprint, library.data_fingerprint, records)


def run(cfg, workdir: str | Path, parent, data, library: Library, progress: bool = True) -> ScoreSet:
    """Score every alternative of the search space; cached in scores/replace1.json."""
    workdir = Path(workdir)
    out_file = workdir / SCORES
    alternatives = [*target_alternatives(cfg, parent.config),
                    *enumerate_pairs(cfg.bld.coupled, cfg.search_space, parent.config)]
    missing = [a.name for a in alternatives if not library.is_done(a)]
    if missing:
        raise PuzzleError(f"the library lacks {len(missing)} blocks (first: {missing[0]}); run `puzzlenas bld` first")
    ids = data.val[: cfg.score.sequences]
    key = fingerprint(library_fingerprint(library), data.fingerprint, cfg.score.sequences, ids.shape)
    rank, world = rank_world()
    if out_file.is_file():
        with contextlib.suppress(PuzzleError):  # an unreadable file is scored again
            cached = read_scores(workdir)
            if cached.fingerprint == key and set(cached.scores) >= {a.name for a in alternatives}:
                if rank == 0:
                    clear_partial(workdir)  # left by a run killed after it wrote the scores
                return cached
    pipeline = place_parent(cfg, parent)  # torchrun: onto this rank's device, with score.parallel=layers split
    # mid-stage resume (resume.py): each writer's sums so far, keyed to these scores' own key
    every = cfg.score.checkpoint_seconds
    if pipeline is not None:  # the sums live on the last rank: it alone keeps the state file
        state = ScoreProgress(workdir if rank == world - 1 else None, f"layers-of{world}", key, every)
        scores = summarize(alternatives, *score_split(parent, library, alternatives, ids, cfg.score.batch_size,
                                                      pipeline, progress, state))
    else:  # one process; or torchrun's score.parallel=alternatives: each rank every world-th alternative
        device = next(parent.parameters()).device
        state = ScoreProgress(workdir, f"rank{rank}-of{world}", key, every)
        mine = score_alternatives(parent, library, alternatives[rank::world], ids.to(device), cfg.score.batch_size,
                                  progress and rank == 0, state)
        scores = gather_scores(mine, alternatives)
    if state.file is not None:
        log.info("scoring: %d of %d alternative runs done in this run%s", state.ran, state.total,
                 f", {state.total - state.ran} taken up from {state.file.name}" if state.ran < state.total else "")
    result = ScoreSet(key, library.parent_fingerprint, int(ids[:, 1:].numel()), scores)
    if rank == 0:
        write_scores(workdir, result)
    barrier()
    if rank == 0:
        clear_partial(workdir)
    return result


def format_scores(result: ScoreSet, metric: str = "kl", top: int | None = None) -> str:
    rows = sorted(result.scores.items())
    lines = [f"{'alternative':<28} {'kl':>9} {'dLM loss':>9} {'agree':>7}"]
    for name, m in rows[:top]:
        lines.append(f"{name:<28} {m['kl']:>9.4f} {m['lm_loss_delta']:>9.4f} {m['agreement']:>7.3f}")
    return "\n".join(lines)
