"""Interaction-corrected search: re-score the alternatives inside the current child, solve again.

    puzzlenas search CONFIG --workdir W --set search.refine_rounds=3

The MIP's objective is a sum of replace-1-block damages, each measured with every other layer
the parent's. Blocks interact, so that sum underestimates the child's real KL (1.5-1.7x on SmolLM2)
and ranks near-equal children poorly. Refinement linearizes around the child instead of the parent:

  round 0   the plain (additive) solution s0
  round r   build s_{r-1} from the library; for every alternative x at layer l measure
              D(s_{r-1} with layer l's choice replaced by x)          (KL to the *parent's* logits)
            on the scoring sequences (data.val[:score.sequences], the same as score); then
              predicted D(s) = D(s_{r-1}) + sum_l [D(s_{r-1} with l -> s_l) - D(s_{r-1})]
            which is exact at s = s_{r-1} and first-order around it; solve the MIP on that, same
            budgets, and stop early when its best solution repeats an earlier child.

The MIP gets damage[l][p] = D(s_{r-1}) / L + delta_l(p), so its objective *is* the prediction. A
pair of two alternatives adds its halves' deltas; a coupled pair (bld.coupled) is re-scored whole.

A first-order prediction can be far off when a round changes neighbouring layers together (on
SmolLM2 at 1.2x with well-trained blocks: predicted 0.252, measured 0.340, against 0.288 for the
additive child). So every round's child is measured (the last one too), and the search's result is
the solutions of the round whose child measured lowest, round 0 included (solutions.json, same
format; `damage` is that round's prediction); every round is recorded in search/refine.json.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..library.init import trace_parent
from ..library.space import (
    Alternative,
    CoupledPair,
    build_unit,
    enumerate_pairs,
    is_parent_alternative,
    pair_name,
    parent_subblock_state,
    target_alternatives,
)
from ..score import compare_logits, damage
from ..score.replace import leave_layer, mean_metrics, run_tail
from ..utils import atomic_write_json
from ..workdir import REFINE
from .mip import Problem, Solution, solve

log = logging.getLogger(__name__)


@torch.no_grad()
def score_inside(parent, child, library, choices: list[tuple[Alternative, Alternative]], units: list,
                 ids: torch.Tensor, batch_size: int = 4, progress: bool = True) -> tuple[dict, dict[str, dict]]:
    """Replace-1-block metrics with the child as the base: (the child's own metrics, {unit name: metrics}).

    `choices`: the child's (attention, FFN) per layer; `units`: alternatives and coupled pairs to
    re-score. Each is put into layer l of the child (the rest of the child unchanged) and compared
    with the parent's logits, as score.score_alternatives compares with the parent's. A unit that is
    the child's own choice gets the child's metrics without being run. The hidden state entering
    layer l is the child's, computed once per batch; only layers l..N run per unit."""
    device = next(parent.parameters()).device
    dtype = next(parent.parameters()).dtype
    own = {a for pair in choices for a in pair} | {CoupledPair(a, f) for a, f in choices}
    todo = [u for u in units if u not in own]
    blocks = {}
    for u in todo:
        block = build_unit(parent.config, u)
        if block is not None:  # the parent's own sub-block (absent from the child) comes from the parent
            own_in_parent = not isinstance(u, CoupledPair) and is_parent_alternative(u, parent.config)
            block.load_state_dict(parent_subblock_state(parent, u) if own_in_parent else library.load_block(u))
            blocks[u] = block.to(device=device, dtype=dtype).eval()
    zero = lambda: {"kl": 0.0, "nll": 0.0, "agree": 0, "n": 0}  # noqa: E731
    totals = {u: zero() for u in todo}
    base = zero()
    parent_nll, n_tokens = 0.0, 0
    by_layer: dict[int, list] = {}
    for u in todo:
        by_layer.setdefault(u.layer, []).append(u)
    bar = tqdm(total=len(todo) * ((len(ids) + batch_size - 1) // batch_size), desc="re-scoring in child",
               unit="alt", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size].to(device)
        labels = batch[:, 1:].flatten()
        parent_logp = F.log_softmax(parent(batch, use_cache=False).logits[:, :-1].flatten(0, 1).float(), dim=-1)
        parent_nll += F.nll_loss(parent_logp, labels, reduction="sum").item()
        n_tokens += labels.numel()
        traced = list(trace_parent(child, batch))  # the child's residual stream, layer by layer
        entering = [(a_in, f_in) for _, a_in, _, f_in, _, _ in traced]
        _, _, _, last_in, last_out, pe = traced[-1]
        m = compare_logits(parent_logp, child.lm_head(child.model.norm(last_in + last_out))[:, :-1].flatten(0, 1), labels)
        for k in base:
            base[k] += m[k]
        for layer_idx, alts in sorted(by_layer.items()):
            h_attn, h_ffn = entering[layer_idx]
            layer = child.model.layers[layer_idx]
            for u in alts:  # the unit in layer l with the child's other sub-block, then the child's tail
                h = leave_layer(layer, u, blocks.get(u), h_attn, h_ffn, pe)
                logits = run_tail(child, h, layer_idx + 1, pe)[:, :-1].flatten(0, 1)
                m = compare_logits(parent_logp, logits, labels)
                for k in totals[u]:
                    totals[u][k] += m[k]
                bar.update(1)
    bar.close()
    parent_loss = parent_nll / n_tokens
    base_metrics = mean_metrics(base, parent_loss)
    scores = {u.name: mean_metrics(totals[u], parent_loss) if u in totals else dict(base_metrics) for u in units}
    return base_metrics, scores


def refined_problem(problem: Problem, child: list[tuple[str, str]], base: dict, scores: dict[str, dict],
                    metric: str) -> Problem:
    """`problem` with damage[l][p] = D(child) / L + (D(child with layer l -> pair p) - D(child)).

    A pair's delta is its own re-scored value when it has one (a coupled pair, or the child's own
    pair: 0), else the sum of its halves' deltas (the child's own half: 0)."""
    d0 = damage(base, metric)
    share = d0 / problem.num_layers
    delta = lambda name: damage(scores[name], metric) - d0  # noqa: E731
    out = []
    for layer, options in enumerate(problem.options):
        own_attention, own_ffn = child[layer]
        row = []
        for attention, ffn in options:
            a, f = Alternative.from_name(attention), Alternative.from_name(ffn)
            if (attention, ffn) == (own_attention, own_ffn):
                row.append(share)
            elif pair_name(a, f) in scores:
                row.append(share + delta(pair_name(a, f)))
            else:
                row.append(share + (0.0 if attention == own_attention else delta(attention))
                           + (0.0 if ffn == own_ffn else delta(ffn)))
        out.append(row)
    return dataclasses.replace(problem, damage=out)


def trust_region(problem: Problem, child: list[tuple[str, str]], max_changes: int) -> Problem:
    """`problem` with one more budget: at most `max_changes` layers may differ from `child` (a
    resource costing 1 for every pair but the child's own, so the MIP states it as any budget)."""
    changes = [[0.0 if option == child[layer] else 1.0 for option in options] for layer, options in enumerate(problem.options)]
    return dataclasses.replace(problem, costs={**problem.costs, "changed_layers": changes},
                               budgets={**problem.budgets, "changed_layers": float(max_changes)})


def refine(problem: Problem, found: list[Solution], rescore: Callable, rounds: int, metric: str,
           solutions: int = 1, diversity: float = 0.2, time_limit: float = 60.0, describe=None,
           mip_gap: float = 1e-3, max_changes: int | None = None,
           measure: Callable | None = None) -> tuple[list[Solution], dict]:
    """Up to `rounds` rounds of re-scoring inside the best child and solving again.

    `found`: the plain search's solutions (round 0); `rescore(pairs)` -> (base metrics, scores) for
    the child with (attention, FFN) names `pairs`; `measure(pairs)` -> that child's own metrics
    (default: rescore's base metrics), for the last round's child, which no later round re-scores.
    `max_changes`: a trust region, at most that many layers differ from the child a round's scores
    were measured in (the prediction is first-order around it). Returns the solutions of the round
    whose best child measured lowest (the plain ones when rounds == 0) and a record of every round."""
    record = {"metric": metric, "max_changes": max_changes,
              "rounds": [{"round": 0, "scores": "replace-1-block in the parent (additive)",
                          "predicted": found[0].objective, "layers": _layers(found[0])}],
              "stopped": "no rounds asked" if rounds == 0 else f"after {rounds} rounds", "kept": 0}
    if rounds == 0:
        return found, record
    children = [found[0].pairs]
    found_in_round = [found]
    for r in range(1, rounds + 1):
        t = time.perf_counter()
        base, scores = rescore(children[-1])
        record["rounds"][r - 1]["measured"] = damage(base, metric)
        p = refined_problem(problem, children[-1], base, scores, metric)
        if max_changes is not None:
            p = trust_region(p, children[-1], max_changes)
        found = solve(p, solutions, diversity, time_limit, describe=describe, mip_gap=mip_gap)
        best = found[0]
        changed = [layer for layer, (old, new) in enumerate(zip(children[-1], best.pairs)) if old != new]
        record["rounds"].append({
            "round": r, "scores": f"re-scored inside the round {r - 1} child",
            "measured_base": damage(base, metric),  # the round r-1 child's real damage on the scoring text
            "predicted": best.objective, "changed_layers": changed, "layers": _layers(best),
            "seconds": round(time.perf_counter() - t, 2)})
        log.info("refine round %d: round %d child measured %s %.4f; new child predicted %.4f, %d layers changed",
                 r, r - 1, metric, damage(base, metric), best.objective, len(changed))
        if best.pairs in children:
            earlier = children.index(best.pairs)
            record["stopped"] = ("converged: the solution repeats the child it was scored in" if not changed
                                 else f"the solution repeats an earlier child (round {earlier})")
            record["rounds"][r]["measured"] = record["rounds"][earlier]["measured"]
            found_in_round.append(found)
            break
        children.append(best.pairs)
        found_in_round.append(found)
    else:  # the last round's child: measured here, as no later round re-scores inside it
        record["rounds"][-1]["measured"] = damage((measure or (lambda pairs: rescore(pairs)[0]))(children[-1]), metric)
    # the round whose child measured lowest; on a tie (a round that repeated an earlier child) the
    # later, whose other solutions were predicted with more measurements
    kept = min(range(len(found_in_round)), key=lambda k: (record["rounds"][k]["measured"], -k))
    record["kept"] = kept
    if kept != len(record["rounds"]) - 1:
        log.info("refine: keeping round %d's solutions (its child measured %s %.4f, the lowest)",
                 kept, metric, record["rounds"][kept]["measured"])
    return found_in_round[kept], record


def _layers(solution: Solution) -> list[dict]:
    return [{"attention": a, "ffn": f} for a, f in solution.pairs]


def make_hook(cfg, workdir: str | Path, parent, data, library, progress: bool = True):
    """search.run's `refine` hook for the pipeline: rounds of cfg.search.refine_rounds on the
    scoring sequences, the record written to search/refine.json."""
    from ..realize import assemble_child

    ids = data.val[: cfg.score.sequences]  # the score stage's text
    units = [*target_alternatives(cfg, parent.config), *enumerate_pairs(cfg.bld.coupled, cfg.search_space, parent.config)]

    def rescore(pairs, todo=units):
        choices = [(Alternative.from_name(a), Alternative.from_name(f)) for a, f in pairs]
        child = assemble_child(parent, choices, library)
        try:
            return score_inside(parent, child, library, choices, todo, ids, cfg.score.batch_size, progress and bool(todo))
        finally:
            del child

    def measure(pairs):  # the child alone, no alternative re-scored
        return rescore(pairs, [])[0]

    def hook(problem: Problem, found: list[Solution], describe) -> list[Solution]:
        s = cfg.search
        found, record = refine(problem, found, rescore, s.refine_rounds, cfg.score.metric, s.solutions, s.diversity,
                               s.time_limit_s, describe, s.mip_gap, s.refine_max_changes, measure)
        record["tokens"] = int(ids[:, 1:].numel())
        atomic_write_json(Path(workdir) / REFINE, record)
        return found

    return hook

