"""Search: turn scores and costs into a MIP, solve it, write search/solutions.json.

    puzzlenas search CONFIG --workdir W --throughput 1.5x --memory 40GiB --solutions 5

A new target is a new solve over the same scores and costs: seconds, no retraining.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from ..config import parse_factor, parse_size
from ..costs.profile import alternative_time, decode_steps, scenario_time
from ..errors import PuzzleError
from ..library.space import Alternative, pair_name
from ..score import damage
from ..workdir import CostProfile, ScoreSet, SearchResult, SolutionRecord, write_solutions
from .mip import Infeasible, Problem, Solution, evaluate, solve

__all__ = ["Infeasible", "Problem", "Solution", "build_problem", "run", "solve", "parse_size", "parse_factor"]

def layer_alternatives(names: list[str]) -> dict[int, dict[str, list[Alternative]]]:
    out: dict[int, dict[str, list[Alternative]]] = {}
    for name in names:
        a = Alternative.from_name(name)
        out.setdefault(a.layer, {"attention": [], "ffn": []})[a.sub].append(a)
    return out


def build_problem(scores: dict, profile: CostProfile, metric: str, alternatives: list[str], engine=None) -> tuple[Problem, dict]:
    """MIP data from replace-1-block scores and a cost profile; also the parent's resources. With an
    `engine`, (attention, FFN) pairs it cannot serve in one layer are left out."""
    by_layer = layer_alternatives(alternatives)
    options, dmg = [], []
    costs = {"time": [], "memory": [], "latency": [], "params": []}
    for layer in sorted(by_layer):
        pairs = list(itertools.product(by_layer[layer]["attention"], by_layer[layer]["ffn"]))
        if engine is not None:
            pairs = [(a, f) for a, f in pairs if engine.unsupported_pair(a, f, None) is None]
        options.append([(a.name, f.name) for a, f in pairs])
        # a coupled pair (trained together) has its own measured damage; others add up their halves
        dmg.append([damage(scores[pair_name(a, f)], metric) if pair_name(a, f) in scores
                    else damage(scores[a.name], metric) + damage(scores[f.name], metric) for a, f in pairs])
        prof = profile.alternatives
        costs["time"].append([alternative_time(profile, a.name) + alternative_time(profile, f.name) for a, f in pairs])
        costs["latency"].append([prof[a.name].decode_s + prof[f.name].decode_s for a, f in pairs])
        costs["memory"].append([prof[x.name].weight_bytes + prof[x.name].kv_bytes + prof[y.name].weight_bytes
                                + prof[y.name].kv_bytes for x, y in pairs])
        costs["params"].append([prof[a.name].params + prof[f.name].params for a, f in pairs])
    shared = profile.shared
    g = decode_steps(profile)
    fixed = {"time": shared.prefill_s + g * shared.decode_s, "latency": shared.decode_s,
             "memory": shared.weight_bytes, "params": shared.params}
    problem = Problem(options, dmg, costs, fixed)
    parent_choice = [_parent_index(opts, profile) for opts in options]
    _, parent_resources = evaluate(problem, parent_choice)
    return problem, parent_resources


def _parent_index(opts: list[tuple[str, str]], profile: CostProfile) -> int:
    # the parent's pair is the one with the most parameters (full KV heads, full FFN)
    return max(range(len(opts)), key=lambda p: profile.alternatives[opts[p][0]].params
               + profile.alternatives[opts[p][1]].params)


def budgets_from_config(search_cfg, parent_resources: dict) -> dict[str, float]:
    budgets = {}
    if search_cfg.throughput is not None:
        budgets["time"] = parent_resources["time"] / parse_factor(search_cfg.throughput)
    if search_cfg.memory_bytes is not None:
        budgets["memory"] = parse_size(search_cfg.memory_bytes)
    if search_cfg.latency_s is not None:
        budgets["latency"] = float(search_cfg.latency_s)
    if search_cfg.params is not None:
        budgets["params"] = float(search_cfg.params)
    if not budgets:
        raise PuzzleError("search needs at least one budget: throughput, memory_bytes, latency_s or params")
    return budgets


def _describe(parent_resources):
    def describe(resource: str, value: float) -> str:
        if resource == "time":
            return f"throughput {parent_resources['time'] / value:.3g}x"
        if resource == "memory":
            return f"memory {value / 2**30:.3g} GiB"
        if resource == "latency":
            return f"decode step {value * 1e3:.3g} ms"
        return f"params {value / 1e6:.4g} M"

    return describe


def run(cfg, workdir: str | Path, scores: ScoreSet, profile: CostProfile, alternatives: list[str],
        refine=None) -> SearchResult:
    """`refine(problem, solutions, describe) -> solutions`: an optional correction of the additive
    solutions (search.refine_rounds > 0: refine.make_hook, which needs the parent and library)."""
    from ..engines import get_engine

    problem, parent_resources = build_problem(scores.scores, profile, cfg.score.metric, alternatives,
                                              get_engine(cfg.target.engine))
    problem.budgets = budgets_from_config(cfg.search, parent_resources)
    found = solve(problem, cfg.search.solutions, cfg.search.diversity, cfg.search.time_limit_s,
                  describe=_describe(parent_resources), mip_gap=cfg.search.mip_gap)
    if refine is not None:
        found = refine(problem, found, _describe(parent_resources))
    out = SearchResult(profile.device, profile.estimated, cfg.score.metric, problem.budgets, parent_resources,
                       tuple(solution_record(rank, sol, profile, parent_resources) for rank, sol in enumerate(found)))
    write_solutions(workdir, out)
    return out


def solution_record(rank: int, sol: Solution, profile: CostProfile, parent_resources: dict) -> SolutionRecord:
    """A solver's solution as search/solutions.json holds it, with its predicted scenario times."""
    return SolutionRecord(rank, sol.objective, parent_resources["time"] / sol.resources["time"],
                          scenario_time(profile, [n for pair in sol.pairs for n in pair]), sol.resources["memory"],
                          sol.resources["params"], tuple(sol.pairs), status=sol.status, solve_seconds=sol.solve_seconds)


def format_solutions(result: SearchResult) -> str:
    label = " (estimated)" if result.estimated else ""
    lines = [f"device: {result.device}{label}   metric: {result.metric}   "
             f"parent: {result.parent['params'] / 1e6:.1f} M params, {result.parent['memory'] / 2**20:.1f} MiB"]
    for s in result.solutions:
        lines.append("")
        lines.append(f"solution {s.rank}: predicted speed-up {s.predicted_speedup:.2f}x{label}, "
                     f"memory {s.memory_bytes / 2**20:.1f} MiB, params {s.params / 1e6:.1f} M, "
                     f"summed {result.metric} {s.damage:.4f}, solved in {s.solve_seconds:.2f} s")
        lines.append(f"  {'layer':>5}  {'attention':<12} {'ffn':<12}")
        for i, layer in enumerate(s.layers):
            attention, ffn = (Alternative.from_name(name).short for name in layer)
            lines.append(f"  {i:>5}  {attention:<12} {ffn:<12}")
    return "\n".join(lines)
