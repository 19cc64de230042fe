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
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import coo_matrix, csr_matrix, vstack

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


# Relative optimality tolerance, as HiGHS defines it: (incumbent - bound) / |incumbent|.
MIP_GAP = 1e-3


class Infeasible(PuzzleError):
    pass


def _flat(problem: Problem):
    offsets, n = [], 0
    for opts in problem.options:
        offsets.append(n)
        n += len(opts)
    return offsets, n


def _constraint_matrix(problem: Problem, budgets: dict[str, float], earlier: list[list[int | None]],
                       diversity: float):
    """Rows: one-pair-per-layer (equalities first), then resources, then diversity (upper bounds)."""
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
    for sol in earlier:  # None: that layer's earlier pair was pruned, so no child can repeat it
        for layer, p in enumerate(sol):
            if p is None:
                continue
            rows.append(row)
            cols.append(offsets[layer] + p)
            vals.append(1.0)
        lb.append(-np.inf)
        ub.append(max_same)
        row += 1
    a = coo_matrix((vals, (rows, cols)), shape=(row, n)).tocsr()
    return a, np.array(lb), np.array(ub), offsets


def _milp(objective, a, lb, ub, upper, time_limit, mip_gap):
    return milp(
        c=objective,
        constraints=LinearConstraint(a, lb, ub),
        integrality=np.ones(len(objective)),
        bounds=Bounds(0, upper),
        options={"time_limit": time_limit, "disp": False, "mip_rel_gap": mip_gap},
    )


def _solve_once(problem: Problem, objective: np.ndarray, budgets: dict[str, float], earlier: list[list[int | None]],
                diversity: float, time_limit: float, mip_gap: float = MIP_GAP):
    """One MIP solve, returning (x or None, status, offsets).

    HiGHS alone spends most of its time on the diverse solutions finding a good incumbent (its root
    sub-MIP heuristic), while the LP bound is already within 0.01 % of the optimum: near-tied damages
    leave many almost-equal children. So we hand it the easy part first:
      1. solve the LP relaxation (a bound, a guide and reduced costs);
      2. keep every layer the LP chose integrally, and solve the small MIP over the layers it left
         fractional (a relaxation-induced neighbourhood, usually a handful of layers);
      3. if that incumbent is within `mip_gap` of the LP bound it is optimal to the same tolerance
         HiGHS itself uses, and we stop;
      4. otherwise HiGHS searches only for a child better than the incumbent by more than the
         tolerance (an objective cutoff row), in a model shrunk by reduced-cost fixing (exact: a pair
         whose reduced cost exceeds cutoff - bound cannot be in such a child). Proving that none
         exists is usually quick, because HiGHS's root cuts close the small remaining gap.
    """
    a, lb, ub, offsets = _constraint_matrix(problem, budgets, earlier, diversity)
    n = len(objective)
    n_eq = problem.num_layers
    start = time.perf_counter()
    lp = linprog(objective, A_ub=a[n_eq:] if a.shape[0] > n_eq else None, b_ub=ub[n_eq:] if a.shape[0] > n_eq else None,
                 A_eq=a[:n_eq], b_eq=lb[:n_eq], bounds=(0, 1), method="highs",
                 options={"time_limit": time_limit})
    if lp.status == 2:  # the relaxation is infeasible, so is the MIP
        return None, "infeasible", offsets
    if lp.status != 0:  # no usable relaxation (time limit): plain HiGHS
        result = _milp(objective, a, lb, ub, np.ones(n), time_limit, mip_gap)
        return result.x, _status(result), offsets

    x_lp, bound = lp.x, lp.fun
    incumbent, best = None, np.inf
    upper = np.ones(n)
    for layer, opts in enumerate(problem.options):
        seg = x_lp[offsets[layer] : offsets[layer] + len(opts)]
        if seg.max() > 1 - 1e-7:  # integral in the LP: keep its choice for the neighbourhood
            upper[offsets[layer] : offsets[layer] + len(opts)] = 0
            upper[offsets[layer] + int(seg.argmax())] = 1
    remaining = max(time_limit - (time.perf_counter() - start), 1e-3)
    local = _milp(objective, a, lb, ub, upper, remaining, mip_gap)
    if local.x is not None:
        incumbent, best = local.x, float(objective @ local.x)
        if best - bound <= mip_gap * max(abs(best), 1e-12):
            return incumbent, "optimal", offsets

    upper = np.ones(n)
    if incumbent is not None:
        # Only a child better than the incumbent by more than the tolerance is worth finding: say so
        # with an objective cutoff row, and drop every pair whose reduced cost rules it out (exact).
        cutoff = best - mip_gap * abs(best)
        upper[lp.lower.marginals > cutoff - bound + 1e-9] = 0
        a = vstack([a, csr_matrix(objective[None, :])]).tocsr()
        lb, ub = np.append(lb, -np.inf), np.append(ub, cutoff)
    remaining = max(time_limit - (time.perf_counter() - start), 1e-3)
    result = _milp(objective, a, lb, ub, upper, remaining, mip_gap)
    if result.x is not None:
        return result.x, _status(result), offsets
    if incumbent is not None and result.status == 2:
        return incumbent, "optimal", offsets  # nothing beats the incumbent by more than the tolerance
    if incumbent is not None:
        return incumbent, "time_limit", offsets
    return None, _status(result), offsets


def _status(result) -> str:
    return "optimal" if result.status == 0 else ("infeasible" if result.status == 2 else "time_limit")


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
    x, _, offsets = _solve_once(problem, obj, other_budgets, [], 0.0, time_limit)
    if x is None:
        return None
    return evaluate(problem, _decode(problem, x, offsets))[1][resource]


def prune_dominated(problem: Problem, taken: list[set[int]] | None = None) -> tuple[Problem, list[list[int]]]:
    """Drop, per layer, every pair that another pair beats or ties on damage and on every
    constrained resource. HiGHS gets a smaller model (a Llama-70B-sized space shrinks severalfold).

    Exactness: swapping a dominated pair q for its dominator p never makes a child worse or break a
    budget, and it cannot break the diversity rule either unless p is what an earlier solution chose
    in that layer (`taken[l]`): so only a dominator outside `taken[l]` may remove q. Returns the
    reduced problem and, per layer, the original index of each kept pair.
    """
    names = list(problem.budgets)
    kept_all = []
    for layer in range(problem.num_layers):
        vec = np.column_stack([np.asarray(problem.damage[layer], dtype=float),
                               *(np.asarray(problem.costs[r][layer], dtype=float) for r in names)])
        rank = np.empty(len(vec), dtype=int)
        rank[np.lexsort(vec.T[::-1])] = np.arange(len(vec))  # ties: only the first of equals may remove the rest
        allowed = np.ones(len(vec), dtype=bool)
        allowed[list(taken[layer] if taken else ())] = False
        # q goes iff an allowed p, earlier in that order, is <= q everywhere. The greedy "kept
        # dominators only" rule removes the same pairs, because dominance is transitive.
        dominates = np.all(vec[:, None, :] <= vec[None, :, :], axis=-1) & (rank[:, None] < rank[None, :]) & allowed[:, None]
        kept = np.flatnonzero(~dominates.any(axis=0)).tolist()
        kept_all.append(kept)  # flatnonzero: already in index order
    reduced = Problem(
        [[problem.options[layer][p] for p in kept] for layer, kept in enumerate(kept_all)],
        [[problem.damage[layer][p] for p in kept] for layer, kept in enumerate(kept_all)],
        {r: [[c[layer][p] for p in kept] for layer, kept in enumerate(kept_all)] for r, c in problem.costs.items()},
        dict(problem.fixed),
        dict(problem.budgets),
    )
    return reduced, kept_all


def solve(problem: Problem, solutions: int = 1, diversity: float = 0.2, time_limit: float = 60.0,
          describe=None, mip_gap: float = MIP_GAP) -> list[Solution]:
    """Up to `solutions` solutions, each differing from all earlier ones in >= diversity * L layers.

    Each is the least-damage child (within `mip_gap`) among those that meet every budget and differ
    enough from the earlier ones. Raises Infeasible (one line: which budget, and the cheapest
    reachable value under the others) when not even the first exists. `describe(resource, value)`
    formats a resource for messages. Dominated pairs are removed before each solve (see
    prune_dominated); choices index the original options.
    """
    describe = describe or (lambda r, v: f"{r}={v:.4g}")
    for name in problem.budgets:
        if name not in problem.costs:
            raise PuzzleError(f"budget on unknown resource {name!r} (known: {', '.join(problem.costs)})")
    found: list[Solution] = []
    for _ in range(solutions):
        t = time.perf_counter()
        taken = [{s.choice[layer] for s in found} for layer in range(problem.num_layers)]
        reduced, kept = prune_dominated(problem, taken)
        position = [{orig: i for i, orig in enumerate(k)} for k in kept]
        earlier = [[position[layer].get(c) for layer, c in enumerate(s.choice)] for s in found]
        objective = np.concatenate([np.asarray(d, dtype=float) for d in reduced.damage])
        x, status, offsets = _solve_once(reduced, objective, reduced.budgets, earlier, diversity, time_limit, mip_gap)
        if x is None:
            if found:
                break  # the diversity rule leaves no further solution: return what exists
            raise Infeasible(_infeasibility_message(reduced, time_limit, describe))
        choice = [kept[layer][p] for layer, p in enumerate(_decode(reduced, x, offsets))]
        damage, resources = evaluate(problem, choice)
        pairs = [problem.options[layer][p] for layer, p in enumerate(choice)]
        found.append(Solution(status, damage, choice, pairs, resources, time.perf_counter() - t))
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
