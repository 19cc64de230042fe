"""Two searches to compare the MIP against (benchmarks/ablations.py), on the same Problem:

  greedy  start from the parent and repeatedly make the one-layer swap with the least added damage
          per unit of the violated budget it saves (time first), until every budget holds
  random  start from the parent and, layers in a seeded random order, swap a layer to a random
          cheaper pair, until every budget holds (the paper's "library blocks chosen at random")

Both see only what the MIP sees (build_problem: pairs the engine cannot serve are already left
out), meet the same budgets (throughput, memory, latency, params) and return a mip.Solution.

    from puzzlenas.search.heuristics import run
    result = run(cfg, scores, profile, alternatives, "greedy")   # a SearchResult, as search.run returns
"""

from __future__ import annotations

import random as _random
import time

from ..workdir import CostProfile, ScoreSet, SearchResult
from .mip import Infeasible, Problem, Solution, evaluate

METHODS = ("greedy", "random")


def _excess(problem: Problem, resources: dict[str, float]) -> dict[str, float]:
    """Budgets that do not hold yet: resource -> how far over it is."""
    return {r: resources[r] - b for r, b in problem.budgets.items() if resources[r] > b * (1 + 1e-12)}


def _primary(excess: dict[str, float]) -> str:
    # the throughput target is what the comparison is about: save time first, then the others
    return "time" if "time" in excess else next(iter(excess))


def _solution(problem: Problem, choice: list[int], status: str, start: float) -> Solution:
    damage, resources = evaluate(problem, choice)
    pairs = [problem.options[layer][p] for layer, p in enumerate(choice)]
    return Solution(status, damage, list(choice), pairs, resources, time.perf_counter() - start)


def _infeasible(problem: Problem, method: str, excess: dict[str, float]) -> Infeasible:
    r = _primary(excess)
    return Infeasible(f"{method} search: no swap left saves {r} and the {r} budget is still "
                      f"{excess[r] / problem.budgets[r]:.1%} over")


def greedy(problem: Problem, start_choice: list[int]) -> Solution:
    """Least damage per unit saved, one layer at a time. A swap may not break a budget that holds."""
    t0 = time.perf_counter()
    choice = list(start_choice)
    while True:
        _, resources = evaluate(problem, choice)
        excess = _excess(problem, resources)
        if not excess:
            return _solution(problem, choice, "greedy", t0)
        r = _primary(excess)
        best, best_rate = None, None
        for layer, options in enumerate(problem.options):
            cur = choice[layer]
            for p in range(len(options)):
                saved = problem.costs[r][layer][cur] - problem.costs[r][layer][p]
                if saved <= 0:
                    continue
                # a swap must not push a budget that holds over it (e.g. memory while saving time)
                if any(resources[o] - problem.costs[o][layer][cur] + problem.costs[o][layer][p] > b * (1 + 1e-12)
                       for o, b in problem.budgets.items() if o not in excess):
                    continue
                rate = (problem.damage[layer][p] - problem.damage[layer][cur]) / saved
                if best_rate is None or rate < best_rate:
                    best, best_rate = (layer, p), rate
        if best is None:
            raise _infeasible(problem, "greedy", excess)
        choice[best[0]] = best[1]


def random_search(problem: Problem, start_choice: list[int], seed: int = 0) -> Solution:
    """Random cheaper pairs in random layers until every budget holds (seeded: the same seed gives
    the same child). Passes over the layers repeat while a budget is still over."""
    t0 = time.perf_counter()
    rng = _random.Random(seed)
    choice = list(start_choice)
    while True:
        _, resources = evaluate(problem, choice)
        excess = _excess(problem, resources)
        if not excess:
            return _solution(problem, choice, "random", t0)
        r = _primary(excess)
        moved = False
        for layer in rng.sample(range(problem.num_layers), problem.num_layers):
            cur = choice[layer]
            cheaper = [p for p in range(len(problem.options[layer]))
                       if problem.costs[r][layer][p] < problem.costs[r][layer][cur]
                       and not any(resources[o] - problem.costs[o][layer][cur] + problem.costs[o][layer][p] > b * (1 + 1e-12)
                                   for o, b in problem.budgets.items() if o not in excess)]
            if not cheaper:
                continue
            choice[layer] = rng.choice(cheaper)
            moved = True
            break  # re-measure: stop as soon as the budgets hold
        if not moved:
            raise _infeasible(problem, "random", excess)


def run(cfg, scores: ScoreSet, profile: CostProfile, alternatives: list[str], method: str, seed: int | None = None,
        metric: str | None = None) -> SearchResult:
    """One heuristic solution as a search result (search/solutions.json's shape, one solution), for
    the same inputs as search.run: replace-1-block scores, a cost profile, the alternatives, and the
    budgets of cfg.search. `metric` overrides cfg.score.metric (the scores hold every metric)."""
    from ..engines import get_engine
    from ..errors import PuzzleError
    from . import _describe, _parent_index, budgets_from_config, build_problem, solution_record

    if method not in METHODS:
        raise PuzzleError(f"unknown heuristic search {method!r} (known: {', '.join(METHODS)})")
    metric = metric or cfg.score.metric
    problem, parent_resources = build_problem(scores.scores, profile, metric, alternatives,
                                              get_engine(cfg.target.engine))
    problem.budgets = budgets_from_config(cfg.search, parent_resources)
    start = [_parent_index(opts, profile) for opts in problem.options]
    try:
        sol = greedy(problem, start) if method == "greedy" else random_search(problem, start, cfg.seed if seed is None else seed)
    except Infeasible as exc:
        describe = _describe(parent_resources)
        budgets = ", ".join(describe(k, v) for k, v in problem.budgets.items())
        raise Infeasible(f"{exc} (budgets: {budgets})") from None
    return SearchResult(profile.device, profile.estimated, metric, problem.budgets, parent_resources,
                        (solution_record(0, sol, profile, parent_resources),), method=method)
