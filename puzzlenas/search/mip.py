"""The mixed-integer program: one (attention, FFN) pair per layer, least damage within budgets.

Built in the order data -> variables -> constraints -> objective, solved by HiGHS through
scipy.optimize.milp. Variables z[l, p] are binary: layer l uses pair p. Constraints:
  exactly one pair per layer                      sum_p z[l, p] = 1
  resources (any of memory, time, latency, params) sum_{l,p} cost_r[l, p] z[l, p] <= budget_r - fixed_r
  diversity with each earlier solution s          sum_l z[l, s_l] <= floor((1 - diversity) * L)
Objective: minimize sum_{l,p} damage[l, p] z[l, p].
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from ..errors import PuzzleError


@dataclass
class Problem:
    """Per layer, the candidate pairs: their names, damage and resource costs.

    options[l] = list of (attention name, ffn name); damage[l] and costs[r][l] are lists aligned with it.
    fixed[r] is the part of resource r every child pays (embeddings, LM head); budgets[r] the limit.
    """

    options: list[list[tuple[str, str]]]
    damage: list[list[float]]
    costs: dict[str, list[list[float]]]
    fixed: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.options)


@dataclass
class Solution:
    status: str  # "optimal" | "time_limit" (feasible, maybe not optimal)
    objective: float
    choice: list[int]  # index into options[l] per layer
    pairs: list[tuple[str, str]]
    resources: dict[str, float]
    solve_seconds: float


class Infeasible(PuzzleError):
    pass


def _flat(problem: Problem):
    offsets, n = [], 0
    for opts in problem.options:
        offsets.append(n)
        n += len(opts)
    return offsets, n


def _solve_once(problem: Problem, objective: np.ndarray, budgets: dict[str, float], earlier: list[list[int]],
                diversity: float, time_limit: float, mip_gap: float = 1e-3):
    offsets, n = _flat(problem)
    L = problem.num_layers
    rows, cols, vals, lb, ub = [], [], [], [], []
    row = 0
    for layer, opts in enumerate(problem.options):  # exactly one pair per layer
        for p in range(len(opts)):
            rows.append(row)
            cols.append(offsets[layer] + p)
            vals.append(1.0)
        lb.append(1.0)
        ub.append(1.0)
        row += 1
    for name, budget in budgets.items():
        cost = problem.costs[name]
        for layer, opts in enumerate(problem.options):
            for p in range(len(opts)):
                rows.append(row)
                cols.append(offsets[layer] + p)
                vals.append(cost[layer][p])
        lb.append(-np.inf)
        ub.append(budget - problem.fixed.get(name, 0.0))
        row += 1
    max_same = math.floor((1 - diversity) * L + 1e-9)
    for sol in earlier:
        for layer, p in enumerate(sol):
            rows.append(row)
            cols.append(offsets[layer] + p)
            vals.append(1.0)
        lb.append(-np.inf)
        ub.append(max_same)
        row += 1
    a = coo_matrix((vals, (rows, cols)), shape=(row, n)).tocsr()
    result = milp(
        c=objective,
        constraints=LinearConstraint(a, np.array(lb), np.array(ub)),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit, "disp": False, "mip_rel_gap": mip_gap},
    )
    return result, offsets


def _decode(problem: Problem, x: np.ndarray, offsets) -> list[int]:
    choice = []
    for layer, opts in enumerate(problem.options):
        seg = x[offsets[layer] : offsets[layer] + len(opts)]
        choice.append(int(np.argmax(seg)))
    return choice


def evaluate(problem: Problem, choice: list[int]) -> tuple[float, dict[str, float]]:
    damage = sum(problem.damage[layer][p] for layer, p in enumerate(choice))
    resources = {
        name: problem.fixed.get(name, 0.0) + sum(cost[layer][p] for layer, p in enumerate(choice))
        for name, cost in problem.costs.items()
    }
    return damage, resources


def _cheapest(problem: Problem, resource: str, other_budgets: dict[str, float], time_limit: float) -> float | None:
    obj = np.concatenate([np.asarray(c, dtype=float) for c in problem.costs[resource]])
    result, offsets = _solve_once(problem, obj, other_budgets, [], 0.0, time_limit)
    if result.x is None:
        return None
    return evaluate(problem, _decode(problem, result.x, offsets))[1][resource]


def prune_dominated(problem: Problem) -> tuple[Problem, list[list[int]]]:
    """Drop, per layer, every pair that another pair beats or ties on damage and on every
    constrained resource. The optimum never needs a dominated pair, and HiGHS gets a smaller
    model (a Llama-70B-sized space shrinks severalfold). Returns the reduced problem and, per layer,
    the original index of each kept pair."""
    names = list(problem.budgets)
    kept_all = []
    for layer, opts in enumerate(problem.options):
        vec = np.array([[problem.damage[layer][p], *(problem.costs[r][layer][p] for r in names)] for p in range(len(opts))])
        order = np.lexsort(vec.T[::-1])  # by damage, then costs: a dominator comes before what it dominates
        kept: list[int] = []
        for p in order:
            if not any(np.all(vec[q] <= vec[p]) for q in kept):
                kept.append(int(p))
        kept_all.append(sorted(kept))
    reduced = Problem(
        [[problem.options[layer][p] for p in kept] for layer, kept in enumerate(kept_all)],
        [[problem.damage[layer][p] for p in kept] for layer, kept in enumerate(kept_all)],
        {r: [[c[layer][p] for p in kept] for layer, kept in enumerate(kept_all)] for r, c in problem.costs.items()},
        dict(problem.fixed),
        dict(problem.budgets),
    )
    return reduced, kept_all


def solve(problem: Problem, solutions: int = 1, diversity: float = 0.2, time_limit: float = 60.0,
          describe=None) -> list[Solution]:
    """Up to `solutions` solutions, each differing from all earlier ones in >= diversity * L layers.

    Raises Infeasible (one line: which budget, and the cheapest reachable value under the others)
    when not even the first exists. `describe(resource, value)` formats a resource for messages.
    Dominated pairs are removed first (see prune_dominated); choices index the original options.
    """
    describe = describe or (lambda r, v: f"{r}={v:.4g}")
    for name in problem.budgets:
        if name not in problem.costs:
            raise PuzzleError(f"budget on unknown resource {name!r} (known: {', '.join(problem.costs)})")
    original = problem
    problem, kept = prune_dominated(problem)
    objective = np.concatenate([np.asarray(d, dtype=float) for d in problem.damage])
    found: list[Solution] = []
    for _ in range(solutions):
        t = time.perf_counter()
        result, offsets = _solve_once(problem, objective, problem.budgets, [s.choice for s in found], diversity,
                                      time_limit)
        seconds = time.perf_counter() - t
        if result.x is None:
            if found:
                break  # the diversity rule leaves no further solution: return what exists
            raise Infeasible(_infeasibility_message(problem, time_limit, describe))
        choice = _decode(problem, result.x, offsets)
        found.append(Solution("optimal" if result.status == 0 else "time_limit", 0.0, choice, [], {}, seconds))
    for sol in found:  # back to the caller's option indices
        sol.choice = [kept[layer][p] for layer, p in enumerate(sol.choice)]
        sol.objective, sol.resources = evaluate(original, sol.choice)
        sol.pairs = [original.options[layer][p] for layer, p in enumerate(sol.choice)]
    return found


def _infeasibility_message(problem: Problem, time_limit: float, describe) -> str:
    parts = []
    for name, budget in problem.budgets.items():
        others = {k: v for k, v in problem.budgets.items() if k != name}
        best = _cheapest(problem, name, others, time_limit)
        if best is None:
            continue
        if best > budget + 1e-12:
            parts.append(f"{describe(name, budget)} is unreachable: the cheapest child under the other constraints "
                         f"has {describe(name, best)}")
    if not parts:
        parts.append("the budgets cannot all hold together: " + ", ".join(describe(k, v) for k, v in problem.budgets.items()))
    return "no architecture fits: " + "; ".join(parts)
