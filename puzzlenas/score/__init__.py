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
from ..library.space import (
    Alternative,
    CoupledPair,
    build_unit,
    enumerate_pairs,
    is_parent_alternative,
    target_alternatives,
)
from ..library.store import Library
from ..utils import fingerprint
from ..workdir import SCORES, ScoreSet, read_scores, write_scores

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


def compare_logits(parent_logp: torch.Tensor, child_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Summed (not averaged) KL, child NLL and agreement over the (N, V) positions."""
    child_logp = F.log_softmax(child_logits.float(), dim=-1)
    kl = (parent_logp.exp() * (parent_logp - child_logp)).sum(-1)
    nll = F.nll_loss(child_logp, labels, reduction="sum")
    agree = (child_logp.argmax(-1) == parent_logp.argmax(-1)).sum()
    return {"kl": kl.sum().item(), "nll": nll.item(), "agree": agree.item(), "n": labels.numel()}


def _run_tail(parent, h: torch.Tensor, start_layer: int, pe) -> torch.Tensor:
    """Layers start_layer..N of the parent, then the final norm and LM head: (B, T, V) logits."""
    for layer in parent.model.layers[start_layer:]:
        h = layer(h, pe)
    return parent.lm_head(parent.model.norm(h))


@torch.no_grad()
def score_alternatives(parent, library: Library | None, alternatives: list[Alternative], ids: torch.Tensor,
                       batch_size: int = 4, progress: bool = True) -> dict[str, dict]:
    """Replace-1-block metrics for `alternatives` on token sequences `ids` (N, T)."""
    device = next(parent.parameters()).device
    todo = [a for a in alternatives if isinstance(a, CoupledPair) or not is_parent_alternative(a, parent.config)]
    blocks = {}
    for a in todo:
        block = build_unit(parent.config, a)
        if block is not None:
            block.load_state_dict(library.load_block(a))
            blocks[a] = block.to(device=device, dtype=next(parent.parameters()).dtype).eval()
    totals = {a: {"kl": 0.0, "nll": 0.0, "agree": 0, "n": 0} for a in todo}
    parent_nll, n_tokens = 0.0, 0
    by_layer: dict[int, list[Alternative]] = {}
    for a in todo:
        by_layer.setdefault(a.layer, []).append(a)
    bar = tqdm(total=len(todo) * ((len(ids) + batch_size - 1) // batch_size), desc="scoring", unit="alt",
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size].to(device)
        labels = batch[:, 1:].flatten()
        model = parent.model
        traced = list(trace_parent(parent, batch))
        # (residual entering attention, entering FFN) per layer: the shared prefix
        entering = [(a_in, f_in) for _, a_in, _, f_in, _, _ in traced]
        _, _, _, last_in, last_out, pe = traced[-1]
        h = last_in + last_out  # leaving the last layer
        parent_logits = parent.lm_head(model.norm(h))[:, :-1].flatten(0, 1)
        parent_logp = F.log_softmax(parent_logits.float(), dim=-1)
        parent_nll += F.nll_loss(parent_logp, labels, reduction="sum").item()
        n_tokens += labels.numel()
        for layer_idx, alts in sorted(by_layer.items()):
            h_attn, h_ffn = entering[layer_idx]
            parent_layer = model.layers[layer_idx]
            for a in alts:
                block = blocks.get(a)
                if a.sub == "attention":
                    h2 = h_attn if block is None else h_attn + block(h_attn, pe)
                    if parent_layer.mlp is not None:
                        h2 = h2 + parent_layer.mlp(parent_layer.post_attention_layernorm(h2))
                elif a.sub == "ffn":
                    h2 = h_ffn if block is None else h_ffn + block(h_ffn, pe)
                else:  # a coupled pair replaces the whole layer
                    h2 = h_attn + block(h_attn, pe)
                logits = _run_tail(parent, h2, layer_idx + 1, pe)[:, :-1].flatten(0, 1)
                m = compare_logits(parent_logp, logits, labels)
                for k in totals[a]:
                    totals[a][k] += m[k]
                bar.update(1)
    bar.close()
    parent_loss = parent_nll / n_tokens
    out = {}
    for a in alternatives:
        if a in totals:
            t = totals[a]
            lm_loss = t["nll"] / t["n"]
            out[a.name] = {"kl": t["kl"] / t["n"], "lm_loss": lm_loss, "lm_loss_delta": lm_loss - parent_loss,
                           "agreement": t["agree"] / t["n"]}
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
    if out_file.is_file():
        with contextlib.suppress(PuzzleError):  # an unreadable file is scored again
            cached = read_scores(workdir)
            if cached.fingerprint == key and set(cached.scores) >= {a.name for a in alternatives}:
                return cached
    device = next(parent.parameters()).device
    scores = score_alternatives(parent, library, alternatives, ids.to(device), cfg.score.batch_size, progress)
    result = ScoreSet(key, library.parent_fingerprint, int(ids[:, 1:].numel()), scores)
    write_scores(workdir, result)
    return result


def format_scores(result: ScoreSet, metric: str = "kl", top: int | None = None) -> str:
    rows = sorted(result.scores.items())
    lines = [f"{'alternative':<28} {'kl':>9} {'dLM loss':>9} {'agree':>7}"]
    for name, m in rows[:top]:
        lines.append(f"{name:<28} {m['kl']:>9.4f} {m['lm_loss_delta']:>9.4f} {m['agreement']:>7.3f}")
    return "\n".join(lines)
